"""Image input (gptlab.vision): the patch prefix against hand-built references, the KV cache and batching with an
image prefix, the datasets, training and its resume, the planner's counts, image files, and image_url serving
through the official openai client."""

import asyncio
import base64
import io
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gptlab import checkpoint
from gptlab.config import GPTConfig, preset
from gptlab.data.image_files import MAX_PIXELS, decode_data_uri, to_tensor
from gptlab.data.images import HOLDOUT, ImageExamples
from gptlab.data.prepare import prepare_images
from gptlab.errors import GptlabError
from gptlab.eval.vision import derangement
from gptlab.generate import Engine, Sampling
from gptlab.image_prefix import ImagePrefix, patchify, unpatchify
from gptlab.model import GPT
from gptlab.plan.shape import Shape, image_flops, params
from gptlab.serve.scheduler import InvalidRequest, Request, Scheduler
from gptlab.tokenizer import from_spec

from .conftest import ENV, Served, kill_once_written, losses, run_cli

GREEDY = Sampling(temperature=0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision") / "shapes"
    prepare_images("shapes", out, images=200, image_size=16, seed=0)
    return out


@pytest.fixture(scope="module")
def meta(shapes):
    return json.loads((shapes / "meta.json").read_text())


def vision_model(meta, **kw):
    torch.manual_seed(0)
    base = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=meta["vocab_size"], init_std=0.2, image_size=16)
    cfg = GPTConfig(**{**base, "block_size": 16 + meta["text_tokens"] - 1, **kw})
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def images(shapes):
    return to_tensor(np.load(shapes / "val_images.npy")[:4])


def test_patches_are_raster_order_rows_of_pixels_and_unpatchify_inverts_them():
    x = torch.rand(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    for i, j in itertools.product(range(2), range(3)):  # patch (i, j) = its pixels, (row, column, channel) order
        want = x[:, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].permute(0, 2, 3, 1).reshape(2, -1)
        assert torch.equal(p[:, 3 * i + j], want)
    sq = torch.rand(2, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(sq, 4), 4, 16, 3), sq)


def test_left_padded_rows_keep_their_padding_before_the_image():
    prefix, text = torch.randn(3, 2, 5), torch.randn(3, 4, 5)
    pad = torch.tensor([0, 1, 3])
    out = ImagePrefix.prepend(prefix, text, pad)
    for r, p in enumerate(pad.tolist()):  # (padding, image, text) per row
        want = torch.cat([text[r, :p], prefix[r], text[r, p:]])
        assert torch.equal(out[r], want)


def test_image_tokens_carry_no_loss_and_come_first(meta, images):
    """The loss is the cross-entropy of the text positions only, of a sequence whose first image_tokens positions
    hold the projected patches (built here by hand from the model's parts)."""
    model = vision_model(meta)
    B, T = 4, 12
    x = torch.randint(0, meta["vocab_size"], (B, T))
    y = torch.randint(0, meta["vocab_size"], (B, T))
    y[:, :3] = -1  # padding targets are ignored too
    logits, _ = model(x, images=images)
    _, loss = model(x, y, images=images)
    v = model.vision
    prefix = v.proj(patchify(images, 4)) + (v.row[:, None] + v.col[None, :]).flatten(0, 1)
    h = torch.cat([prefix, model.wte(x)], 1) + model.wpe(torch.arange(16 + T))
    for block in model.h:
        h = block(h)
    full = model.lm_head(model.ln_f(h))
    assert logits.shape == (B, T, meta["vocab_size"])
    torch.testing.assert_close(logits, full[:, 16:], rtol=1e-5, atol=1e-5)
    want = F.cross_entropy(full[:, 16:].reshape(-1, full.size(-1)), y.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [0, 5])
def test_the_cnn_prefix_is_two_convolutions_then_the_projector(meta, images, width):
    """Width 0 (the image's channels): a residual block, pixels plus conv(gelu(conv(pixels))); another width: the
    block's output alone. Then 4x4 patches through the LLaVA-1.5 MLP, plus the row and column positions."""
    model = vision_model(meta, image_encoder="cnn", projector="mlp", encoder_width=width)
    v = model.vision
    c1, c2 = v.encoder[0], v.encoder[2]
    y = F.conv2d(F.gelu(F.conv2d(images, c1.weight, c1.bias, padding=1)), c2.weight, c2.bias, padding=1)
    feats = images + y if width == 0 else y
    l1, l2 = v.proj[0], v.proj[2]
    want = F.linear(F.gelu(F.linear(patchify(feats, 4), l1.weight, l1.bias)), l2.weight, l2.bias)
    want = want + (v.row[:, None] + v.col[None, :]).flatten(0, 1)
    torch.testing.assert_close(v(images), want, rtol=1e-5, atol=1e-5)


def uncached_greedy(model, ids, image, n):
    ids = list(ids)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]), images=image)
        ids.append(int(logits[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("encoder,projector,width", [("linear", "linear", 0), ("cnn", "mlp", 4), ("cnn", "linear", 0)])
def test_cached_greedy_equals_uncached_and_a_batch_equals_each_alone(meta, images, encoder, projector, width):
    model = vision_model(meta, image_encoder=encoder, projector=projector, encoder_width=width)
    tok = from_spec(meta["tokenizer"])
    engine = Engine(model, tok)
    prompts = [[tok.eot_id, *tok.encode(t)] for t in ("Q: what colour? A:", "Q: where? A:", "", "Q: how many?")]
    n = 10
    batch = [c.tokens for c in engine.generate_tokens(prompts, n, GREEDY, stop_ids=(), images=images)]
    alone = [
        engine.generate_tokens([p], n, GREEDY, stop_ids=(), images=images[i : i + 1])[0].tokens
        for i, p in enumerate(prompts)
    ]
    reference = [uncached_greedy(model, p, images[i : i + 1], n) for i, p in enumerate(prompts)]
    assert batch == alone == reference
    assert len({tuple(t) for t in reference}) > 1  # the images and prompts matter


def test_the_model_refuses_a_wrong_image_in_one_line(meta):
    model = vision_model(meta)
    x = torch.zeros(1, 3, dtype=torch.long)
    for bad in (torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 16, 16), torch.zeros(3, 16, 16)):
        with pytest.raises(GptlabError, match=r"do not fit this model.*16 patches of 4x4"):
            model(x, images=bad)
    with pytest.raises(GptlabError, match="takes no images"):
        GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=10))(x, images=torch.zeros(1, 3, 4, 4))
    with pytest.raises(GptlabError, match="not a multiple of patch_size"):
        GPTConfig(image_size=30, patch_size=4)
    with pytest.raises(GptlabError, match="leaves no room for text"):
        GPTConfig(image_size=32, patch_size=4, block_size=64)


def test_the_shapes_dataset_is_seeded_holds_out_its_pairs_and_captions_match_labels(shapes, meta, tmp_path):
    again = tmp_path / "again"
    prepare_images("shapes", again, images=200, image_size=16, seed=0)
    for f in sorted(p.name for p in shapes.glob("*.npy")):
        assert np.array_equal(np.load(shapes / f), np.load(again / f)), f
    tok = from_spec(meta["tokenizer"])
    held = {tuple(p) for p in HOLDOUT}
    for split in ("train", "val", "holdout"):
        labels = np.load(shapes / f"{split}_labels.npy")
        texts = np.load(shapes / f"{split}_texts.npy")
        pairs = {(meta["answers"]["colour"][c], meta["answers"]["shape"][s]) for c, s in labels[:, :2]}
        assert (pairs <= held) if split == "holdout" else not (pairs & held)
        for row, lab in zip(texts[:20], labels[:20]):
            words = tok.decode([t for t in row[0] if t >= 0 and t != tok.eot_id])
            answers = {a: meta["answers"][a][i] for a, i in zip(meta["questions"], lab)}
            assert words.startswith(f"{answers['count']} {answers['size']} {answers['colour']} {answers['shape']}")
            assert words.endswith(answers["position"])
            for k, (a, q) in enumerate(meta["questions"].items(), 1):
                assert tok.decode([t for t in row[k] if t >= 0 and t != tok.eot_id]) == f"{q} {answers[a]}"
    img = np.load(shapes / "train_images.npy")[0]
    assert img.dtype == np.uint8 and img.shape == (16, 16, 3)


def test_the_loader_is_a_pure_function_of_the_step_and_pads_with_no_loss(shapes, meta):
    a = ImageExamples(shapes, "train", 16 + meta["text_tokens"] - 1, seed=3, prefix=16)
    b = ImageExamples(shapes, "train", 16 + meta["text_tokens"] - 1, seed=3, prefix=16)
    x1, y1, i1 = a.batch(8, 5, 1)
    x2, y2, i2 = b.batch(8, 5, 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    assert not torch.equal(a.batch(8, 6, 1)[0], x1)
    assert (y1 == -1).any() and (x1 >= 0).all() and i1.shape == (8, 3, 16, 16) and 0 <= i1.min() <= i1.max() <= 1
    with pytest.raises(GptlabError, match="cannot hold the image prefix"):
        ImageExamples(shapes, "train", 20, prefix=16)


def test_the_planner_counts_the_image_prefix_exactly():
    for enc, proj, w, ch in itertools.product(("linear", "cnn"), ("linear", "mlp"), (0, 5), (1, 3)):
        cfg = preset("baby", vocab_size=40, block_size=104, image_size=32, image_channels=ch)
        cfg = cfg.replace(image_encoder=enc, projector=proj, encoder_width=w)
        assert GPT(cfg).num_params(breakdown=True) == params(Shape.from_config(cfg)), cfg
    s = Shape.from_config(preset("baby", vocab_size=40, block_size=104, image_size=32))
    fl = image_flops(s)
    assert fl["image_tokens"] == 64 and fl["encoder"] == 0
    assert fl["projector"] == 2 * 64 * (48 * 128)  # one 48 -> 128 matmul per patch
    L, d, ctx = 4, 128, 104  # per prefix token: QKV, projection, MLP matmuls and the attention term
    assert fl["decoder"] == 64 * (2 * L * d * 3 * d + 2 * L * d * d + 2 * L * 2 * d * 4 * d + 2 * L * ctx * d)


def test_conversion_to_text_only_formats_is_refused(meta, tmp_path):
    from gptlab.interop.gguf import save_gguf
    from gptlab.interop.hf import save_hf

    model = vision_model(meta)
    sd = model.state_dict()
    with pytest.raises(GptlabError, match="takes images"):
        save_hf(sd, model.config, meta["tokenizer"], tmp_path / "hf")
    with pytest.raises(GptlabError, match="image prefix"):
        save_gguf(sd, model.config, {"kind": "gpt2"}, tmp_path / "m.gguf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


RGB = (np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3)


def test_images_are_converted_to_the_model_s_channels_and_size():
    rgb = RGB
    assert np.array_equal(decode_data_uri("data:image/png;base64," + base64.b64encode(png(rgb)).decode(), 16, 3), rgb)
    grey = decode_data_uri("data:image/png;base64," + base64.b64encode(png(rgb)).decode(), 8, 1)
    want = np.asarray(Image.fromarray(rgb).convert("L").resize((8, 8), Image.Resampling.BICUBIC))
    assert grey.shape == (8, 8, 1) and np.array_equal(grey[..., 0], want)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: black after compositing
    assert decode_data_uri("data:image/png;base64," + base64.b64encode(png(rgba)).decode(), 4, 3).max() == 0


def bad_image_files(tmp_path):
    (tmp_path / "cut.png").write_bytes(png(RGB)[:60])
    Image.new("CMYK", (8, 8)).save(tmp_path / "cmyk.jpg")
    Image.new("L", (4097, 4097)).save(tmp_path / "huge.png")
    assert MAX_PIXELS < 4097 * 4097
    (tmp_path / "text.png").write_text("not an image")


def test_sample_takes_an_image_file_and_bad_images_get_one_line(shapes, meta, tmp_path):
    model = vision_model(meta)
    run = checkpoint.save_model_checkpoint(tmp_path / "m", dict(model.state_dict()), model.config, meta["tokenizer"])
    img = np.load(shapes / "val_images.npy")[0]
    (tmp_path / "a.png").write_bytes(png(img))
    r = run_cli(
        *("sample", str(run), "--image", str(tmp_path / "a.png"), "--prompt", "Q: what colour? A:"),
        *("--temperature", "0", "--max-new-tokens", "6", "--json", "--device", "cpu"),
    )
    assert r.returncode == 0, r.stderr
    tok = from_spec(meta["tokenizer"])
    engine = Engine(model, tok)
    want = engine.generate(["Q: what colour? A:"], 6, GREEDY, images=to_tensor(img))[0].text
    assert json.loads(r.stdout)["samples"] == [want]
    bad_image_files(tmp_path)
    expect = {"cut.png": "damaged or truncated", "cmyk.jpg": "pixel mode CMYK", "huge.png": "over the limit"}
    expect |= {"text.png": "not an image Pillow can read", "missing.png": "cannot read the image"}
    expect |= {"/dev/zero": "not a regular file", "fifo": "not a regular file", ".": "not a regular file"}
    os.mkfifo(tmp_path / "fifo")  # a FIFO nobody writes: reading it would block forever
    for name, msg in expect.items():
        r = run_cli("sample", str(run), "--image", str(tmp_path / name), "--device", "cpu")
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stdout == "" and "Traceback" not in r.stderr
    text_only = run_cli("sample", str(run), "--image", str(tmp_path / "a.png"), "--interactive")
    assert text_only.returncode == 2


def test_the_scheduler_prefills_an_image_with_chunks_like_the_engine(meta, images):
    model = vision_model(meta)
    tok = from_spec(meta["tokenizer"])
    prompts = [[tok.eot_id, *tok.encode(t)] for t in ("Q: what colour? A:", "Q: where? A:", "Q: how many? A:")]
    want = [
        Engine(model, tok).generate_tokens([p], 8, GREEDY, stop_ids=(), images=images[i : i + 1])[0].tokens
        for i, p in enumerate(prompts)
    ]
    text = tok.encode("Q: what size? A:")
    plain = Engine(model, tok).generate_tokens([text], 8, GREEDY, stop_ids=())[0].tokens
    hits = []  # prefix-cache hits, in slots, as admitted

    class Spy:
        def event(self, name, job, **kw):
            if name == "prefix":
                hits.append(kw["hit"])

    sched = Scheduler(model, tok, max_batch=4, prefill_chunk=5, prefix_block=5, metrics=Spy())  # chunked

    async def collect(r):
        out = []
        async for c in sched.submit(r):
            out += c.tokens
        return out

    async def main():
        reqs = [
            Request(p, 8, GREEDY, seed=0, stop_ids=frozenset(), image=images[i : i + 1]) for i, p in enumerate(prompts)
        ]
        return await asyncio.gather(*map(collect, [*reqs, Request(text, 8, GREEDY, seed=0, stop_ids=frozenset())]))

    try:
        got = asyncio.run(main())
        assert got == [*want, plain]
        # the image is part of the prefix cache's key: the same image and text hit, another image with that text not
        again = Request(prompts[0], 8, GREEDY, seed=0, stop_ids=frozenset(), image=images[:1])
        other = Request(prompts[0], 8, GREEDY, seed=0, stop_ids=frozenset(), image=images[:1].flip(-1))
        assert asyncio.run(collect(again)) == want[0] and hits[-1] >= model.config.image_tokens
        asyncio.run(collect(other))
        assert hits[-1] == 0
        with pytest.raises(InvalidRequest, match="do not fit"):
            sched.check(Request(prompts[0], 4, GREEDY, image=torch.zeros(1, 3, 8, 8)))
        with pytest.raises(InvalidRequest, match="after 16 image tokens"):
            sched.check(Request([1] * (model.config.block_size - 10), 4, GREEDY, image=images[:1]))
    finally:
        sched.close()


@pytest.mark.slow
def test_image_url_chat_through_the_openai_client_equals_the_engine(shapes, meta, tmp_path):
    model = vision_model(meta)
    run = checkpoint.save_model_checkpoint(tmp_path / "m", dict(model.state_dict()), model.config, meta["tokenizer"])
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    img = np.load(shapes / "val_images.npy")[1]
    uri = "data:image/png;base64," + base64.b64encode(png(img)).decode()
    tok = from_spec(meta["tokenizer"])
    want = Engine(model, tok).generate(["Q: what shape? A:"], 8, GREEDY, images=to_tensor(img))[0].text
    server = Served(run, "--chat-template", str(template))
    try:
        import openai

        client = server.client()
        content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "Q: what shape? A:"}]
        name = client.models.list().data[0].id
        r = client.chat.completions.create(
            messages=[{"role": "user", "content": content}], model=name, max_tokens=8, temperature=0
        )
        assert r.choices[0].message.content == want
        for bad, why in (
            ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}], "invalid base64"),
            ([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}], "does not fetch"),
            (content + content[:1], "2 images"),
        ):
            with pytest.raises(openai.BadRequestError, match=why):
                client.chat.completions.create(messages=[{"role": "user", "content": bad}], model=name, max_tokens=2)
    finally:
        server.stop()


def test_derangement_moves_every_example():
    for n in (2, 3, 10, 101):
        d = derangement(n, seed=n)
        assert sorted(d) == list(range(n)) and all(d[i] != i for i in range(n))


@pytest.mark.slow
def test_resume_after_sigkill_repeats_the_uninterrupted_image_run(shapes, meta, tmp_path):
    def cmd(out, *extra):
        return [
            *(sys.executable, "-m", "gptlab", "train", "--data", str(shapes), "--model", "tiny"),
            *("--set", "image_encoder=cnn", "--batch-size", "8", "--max-iters", "60", "--log-interval", "1"),
            *("--eval-interval", "20", "--eval-iters", "2", "--checkpoint-interval", "20", "--threads", "1"),
            *("--device", "cpu", "--final-eval-tokens", "2000", "--out-dir", str(out), "--json", *extra),
        ]

    full = subprocess.run(cmd(tmp_path / "full"), env=ENV, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    summary = json.loads(full.stdout.strip().splitlines()[-1])
    assert summary["final_val_loss"] < 2.5  # it learns (uniform over the vocabulary is ln 32 = 3.47)
    kill_once_written(cmd(tmp_path / "killed"), tmp_path / "killed" / "checkpoints" / "step-0000020" / "state.json")
    resumed = subprocess.run(cmd(tmp_path / "killed", "--resume"), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")
    a = checkpoint.load_checkpoint(tmp_path / "full")[0].state_dict()
    b = checkpoint.load_checkpoint(tmp_path / "killed")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = checkpoint.load_checkpoint(tmp_path / "full")[0].config
    assert (cfg.image_size, cfg.image_encoder, cfg.block_size) == (16, "cnn", 16 + meta["text_tokens"])


def test_image_datasets_are_refused_where_they_do_not_apply(shapes, tmp_path):
    r = run_cli(
        "train", "--data", str(shapes), "--model", "tiny", "--set", "image_channels=1", "--out-dir", str(tmp_path / "a")
    )
    assert r.returncode == 2 and "drop the image_size / image_channels override" in r.stderr
    r = run_cli(
        "train", "--data", str(shapes), "--model", "tiny", "--ss-schedule", "linear", "--out-dir", str(tmp_path / "b")
    )
    assert r.returncode == 2 and "scheduled sampling" in r.stderr
    r = run_cli("prepare", "shapes", "digits", "--out-dir", str(tmp_path / "c"))
    assert r.returncode == 2 and "on its own" in r.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = run_cli("prepare", "shapes", "--images", "20", "--out-dir", str(tmp_path / "mine"))
    assert r.returncode == 2 and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))
