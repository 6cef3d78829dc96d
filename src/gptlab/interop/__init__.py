"""Format conversion between gptlab and other ecosystems: Hugging Face folders (:mod:`.hf`: read and write, with
tokenizer files) and OpenAI's GPT-2 release (:mod:`.openai`: read). Loading any source is :mod:`gptlab.loader`."""
