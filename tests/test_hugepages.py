"""Weights on huge pages (gptlab.hugepages): same values, same tied parameters, still trainable."""

import re
from pathlib import Path

import pytest
import torch

from gptlab import hugepages
from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.quant.quantize import quantize_model


def mapping(address: int) -> str:
    """The /proc/self/smaps entry of the mapping holding ``address``."""
    for entry in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        lo, hi = (int(x, 16) for x in entry.split(" ", 1)[0].split("-"))
        if lo <= address < hi:
            return entry
    raise AssertionError(f"{address:#x} is in no mapping")


CFG = GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=128)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_placed_weights_give_the_same_logits_and_stay_tied(quantize):
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    if quantize:
        quantize_model(model, quantize)
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.no_grad():
        before = model(idx)[0]
    big = [t for t in [*model.parameters(), *model.buffers()] if t.nbytes >= hugepages.MIN_WEIGHT_BYTES]
    assert big and hugepages.place_weights(model) is model
    ptrs = [t.data_ptr() for t in big]
    assert hugepages.place_weights(model) is model and [t.data_ptr() for t in big] == ptrs  # a second call: nothing
    big[-1].data = big[-1].data.clone()  # replaced since (as quantization replaces layers): the next call moves it
    hugepages.place_weights(model)
    assert [t.data_ptr() for t in big[:-1]] == ptrs[:-1] and big[-1].data_ptr() != ptrs[-1]
    ptrs[-1] = big[-1].data_ptr()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], before)
    if quantize is None:
        assert model.lm_head.weight is model.wte.weight
    if hugepages.available():
        entry = mapping(ptrs[0])
        assert all(mapping(p) == entry for p in ptrs[:-1])  # one region, and the one moved later in another
        for p in (ptrs[0], ptrs[-1]):
            assert " hg" in re.search(r"^VmFlags:.*$", mapping(p), re.M).group(0), entry  # advised MADV_HUGEPAGE
    else:
        pytest.skip(f"transparent huge pages are {hugepages.thp_mode()} here: values checked, placement not")


def test_a_placed_model_trains_as_before():
    """Moving the weights keeps the Parameter objects: an optimizer made before still steps them, to the same
    values as without the move."""
    runs = []
    for place in (False, True):
        torch.manual_seed(0)
        model = GPT(CFG)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if place:
            hugepages.place_weights(model)
        idx = torch.randint(0, CFG.vocab_size, (2, 17))
        for _ in range(2):
            opt.zero_grad()
            model(idx[:, :-1], idx[:, 1:])[1].backward()
            opt.step()
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
