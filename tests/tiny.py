"""A tiny random Qwen3 causal LM with its own small BPE tokenizer, written to a folder for offline tests.

Deterministic (fixed seed, fixed training text) and fast (well under 2 s). The tokenizer follows Qwen's layout:
`<|im_start|>`, `<|im_end|>` and `<|endoftext|>` are special tokens (skipped when decoding with
`skip_special_tokens=True`); `<tool_call>`, `<think>`, `<tool_response>` and their closers are single added tokens that
are not special, so they survive decoding and the Hermes parser can find them in generated text.
"""

from __future__ import annotations

from pathlib import Path

from mcpft.chat_template import hermes_template, qwen3_template

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"]
TEMPLATES = {"hermes": hermes_template, "qwen3": qwen3_template}
VOCAB_SIZE = 1024
SEED = 0

# Training text for the BPE merges: English, JSON tool calls and schemas, HTML and Playwright aria snapshots.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The user wants to find the title of the page.",
    "Okay, let me think about how to approach this. First, I need to navigate to the website and read the snapshot.",
    "The title of the page is: Trelis Research - Tools and Tutorials for Large Language Models.",
    "I will click the link, then type the query into the search box and press Enter to submit the form.",
    '{"name": "browser_navigate", "arguments": {"url": "https://example.com/"}}',
    '{"name": "browser_click", "arguments": {"element": "Sign in button", "ref": "e12"}}',
    '{"name": "browser_type", "arguments": {"element": "Search", "ref": "e7", "text": "hello", "submit": true}}',
    '{"type": "function", "function": {"name": "browser_snapshot", "description": "Capture accessibility snapshot '
    'of the current page", "parameters": {"type": "object", "properties": {}, "required": []}}}',
    '{"type": "object", "properties": {"url": {"type": "string", "description": "The URL to navigate to"}}, '
    '"required": ["url"], "additionalProperties": false, "$schema": "http://json-schema.org/draft-07/schema#"}',
    '<html><head><title>Example Domain</title></head><body><div class="main"><h1>Welcome</h1>'
    '<a href="/about">About us</a><button type="submit">Search</button><input name="q"></div></body></html>',
    "- Page URL: https://example.com/\n- Page Title: Example Domain\n- Page Snapshot:\n```yaml\n"
    '- generic [ref=e1]:\n  - heading "Welcome" [level=1] [ref=e2]\n  - link "About us" [ref=e3]:\n'
    '    - /url: /about\n  - textbox "Search" [ref=e4]\n  - button "Search" [ref=e5] [cursor=pointer]\n```',
    "### Result\nNavigated to https://example.com/\n### Error\nTimeoutError: locator.click: Timeout 5000ms exceeded.",
    "Looking at the tool response, there is a section with the page title. The answer should mention the three "
    "approaches covered in the article: program synthesis, test-time training and domain-specific languages.",
    "Please book a table for two people tomorrow evening, compare prices across shops, and report the cheapest "
    "option with its delivery date. Remember to check the cart before paying and confirm the order number.",
    '{"id": "call_0", "type": "function", "function": {"name": "browser_wait_for", "arguments": "{\\"time\\": 2}"}}',
    '{"role": "assistant", "content": "Done.", "tool_calls": []} {"role": "tool", "tool_call_id": "call_0"}',
    '- list [ref=e20]:\n  - listitem [ref=e21]:\n    - checkbox "Remember me" [checked] [ref=e22]\n'
    '  - combobox "Country" [ref=e23]: Germany\n  - img "Logo" [ref=e24]\n  - paragraph [ref=e25]: Price 19.99 EUR',
    "0123456789 ,.;:!?()[]{}<>/\\|@#$%^&*-_=+'\"`~ \n\t",
]


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer


def build_tiny_model(path: Path, template: str = "hermes") -> Path:
    """Write a tiny random Qwen3ForCausalLM and its tokenizer (chat template `template`: hermes|qwen3) to `path`."""
    import torch
    from transformers import AddedToken, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    if template not in TEMPLATES:
        raise ValueError(f"template {template!r}: expected one of {', '.join(TEMPLATES)}")
    path = Path(path)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=131072,
        clean_up_tokenization_spaces=False)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    tokenizer.chat_template = TEMPLATES[template]()

    eos_id, pad_id = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id)
    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
