"""Train the bundled tiny reasoning model from a fixed seed.

    .venv/bin/python models/train.py --out models/tinyreason

Builds the character-level tokenizer, trains a small Llama (rotary positions
copy operands far better than GPT-2's learned positions) on problems drawn
from ``models/task.py`` with the reference prompts held out, and saves a
Hugging Face directory that vLLM loads. Loss is on the completion only.
It runs on CPU; the shipped weights took the time noted in the model card.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.task import (  # noqa: E402
    THINK_CLOSE,
    THINK_OPEN,
    Problem,
    answer_if_cut,
    completion,
    sample_problem,
    thinking,
)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
# Every character the task can produce, plus the rest of printable ASCII so
# that any prompt tokenizes without unknowns.
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}"
    "{% endif %}{% endfor %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # Plain (non-special) added tokens: they survive decoding, so the gateway
    # sees the think delimiters in the text stream.
    tok.add_tokens([THINK_OPEN, THINK_CLOSE])
    tok.add_special_tokens([EOS, PAD, UNK])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=EOS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    return fast


def encode_example(tok: PreTrainedTokenizerFast, prompt: str, target: str) -> tuple[list[int], int]:
    p = tok.encode(prompt, add_special_tokens=False)
    c = tok.encode(target, add_special_tokens=False) + [tok.eos_token_id]
    return p + c, len(p)


def forced_example(tok: PreTrainedTokenizerFast, prob: Problem, rng: random.Random) -> tuple[list[int], int]:
    """Reasoning cut at a random point, then ``</think>\n####`` and the answer believed there.

    Only the answer is trained (the cut prefix is context), so the model
    never learns to close its reasoning early, only to answer when made to.
    """
    text = thinking(prob)
    cut = rng.randint(0, len(text))
    context = prob.prompt + THINK_OPEN + text[:cut] + THINK_CLOSE + "\n####"
    return encode_example(tok, context, f" {answer_if_cut(prob, cut)}")


def batch(
    tok: PreTrainedTokenizerFast, rng: random.Random, size: int, exclude: set[str], forced_share: float
) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = []
    while len(seqs) < size:
        prob = sample_problem(rng)
        if prob.prompt in exclude:
            continue
        if rng.random() < forced_share:
            seqs.append(forced_example(tok, prob, rng))
        else:
            seqs.append(encode_example(tok, prob.prompt, completion(prob)))
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((size, width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((size, width), -100, dtype=torch.long)
    for i, (s, n_prompt) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, n_prompt : len(s)] = torch.tensor(s[n_prompt:])
    return ids, labels


def reference_prompts(ref_dir: Path) -> set[str]:
    out = set()
    for path in sorted(ref_dir.glob("arith-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                out.add(json.loads(line)["prompt"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models/tinyreason"))
    ap.add_argument("--references", type=Path, default=Path("references"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forced-share", type=float, default=0.25, help="share of cut-and-forced examples")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    exclude = reference_prompts(args.references)
    print(f"holding out {len(exclude)} reference prompts", flush=True)

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32,
        num_key_value_heads=args.hidden // 32,
        head_dim=32,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    start = time.monotonic()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ids, labels = batch(tok, rng, args.batch, exclude, args.forced_share)
        # fp32: bf16 autocast is ~15x slower on CPUs without AMX.
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.monotonic() - start
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {elapsed / 60:.1f} min", flush=True)

    elapsed = time.monotonic() - start
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    fix_tokenizer_config(args.out)
    (args.out / "training.json").write_text(
        json.dumps(
            {
                "seed": args.seed,
                "steps": args.steps,
                "batch": args.batch,
                "lr": args.lr,
                "hidden": args.hidden,
                "layers": args.layers,
                "forced_share": args.forced_share,
                "parameters": n_params,
                "train_minutes": round(elapsed / 60, 1),
                "torch": torch.__version__,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved to {args.out} after {elapsed / 60:.1f} min", flush=True)


def fix_tokenizer_config(out: Path) -> None:
    """Make the saved tokenizer loadable by vLLM and older transformers."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    template_file = out / "chat_template.jinja"
    if template_file.exists():
        template_file.unlink()


if __name__ == "__main__":
    main()
