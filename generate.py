"""Sample from a Llama checkpoint with a KV cache, temperature and top-p (Meta's semantics).

    python generate.py --ckpt_dir ~/llama/Llama3.1-8B-Instruct --chat --prompt "What is HbA1c?"
    python generate.py --ckpt_dir ~/llama/Llama3.1-8B --adapter out/notes/adapter --prompt "Assessment:"
    python generate.py                      # samples from the demo model that `python train.py` makes

stdout holds only the completion (streamed as it is produced for --prompt; one JSON line per prompt
for --prompts_file, however many it holds); timings and notes go to stderr.
"""

import json
import os
import sys
import time

import torch

import atomic
import checkpoint
import common
import cpu_paths
import lora
from cli import UsageError, UserError, interval, non_empty, one_of, positive, run, torch_device
from data import records
from model import set_kernels
from tokenizer import check_fits, load as load_tokenizer

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "demo", "model")


def sample_top_p(probs, p, generator=None):
    """Meta's nucleus sampling: keep the most likely tokens while the mass before each is <= p
    (so the token that crosses p is kept), renormalise, draw one."""
    probs_sort, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(probs_sort, dim=-1) - probs_sort
    probs_sort = probs_sort.masked_fill(mass_before > p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(order, -1, choice).squeeze(-1)


def next_token(logits, temperature, top_p, generator=None):
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return sample_top_p(probs, top_p, generator)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=0.6, top_p=0.9, stop_ids=(), generator=None,
             on_token=None, timings=None, decode_step=None, n_words=None):
    """Complete each prompt (a list of token ids); returns the new tokens of each, stop token excluded.

    Prompts of different lengths share one KV cache: decoding starts after the shortest prompt, and
    for rows whose prompt is longer the prompt's own token is written instead of the sample (Meta's
    scheme), so every row sees exactly its own tokens. on_token(row, token) is called as tokens come;
    a dict passed as timings receives the seconds spent on the prompt ("prefill") and after ("decode"),
    and in "first_step" the first one-token step's (a compiled step compiles there).
    decode_step: what runs the one-token steps (default model.decode; compile_decode_step makes a
    compiled one). The prompt goes through model.decode itself: its length varies from call to call.
    n_words: sample only ids below it (the tokenizer's size): an embedding padded past the
    tokenizer has rows that no text decodes to. A prompt that is empty or does not fit the model's
    context raises ValueError.
    """
    eager, decode_step = decode_step is None, decode_step or model.decode  # eager: attends over written slots
    B, context, lens = len(prompts), model.args.max_seq_len, [len(p) for p in prompts]
    _check_lengths(lens, context)
    total = min(context, max(lens) + max_new_tokens)
    device = model.tok_embeddings.weight.device
    tokens, is_prompt = _prompt_rows(prompts, total, device)
    last = torch.tensor([min(n + max_new_tokens, total) for n in lens], device=device)  # exclusive
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    model.setup_cache(B, total)
    prev = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    try:
        for cur in range(min(lens), total):
            if cur == min(lens) + 1 and timings is not None:
                sync()
                timings["prefill"] = time.perf_counter() - t0
            if cur == min(lens) + 2 and timings is not None:
                sync()
                timings["first_step"] = time.perf_counter() - t0 - timings["prefill"]
            if cur - prev == 1:  # one token: a tensor position keeps a compiled step from specialising
                logits = decode_step(tokens[:, prev:cur], prev if eager else torch.tensor(prev, device=device))[:, -1]
            else:
                logits = model.decode(tokens[:, prev:cur], prev, last_only=True)[:, -1]
            chosen = next_token(logits[:, :n_words], temperature, top_p, generator)
            chosen = torch.where(is_prompt[:, cur], tokens[:, cur], chosen)
            new = ~is_prompt[:, cur] & ~done
            tokens[:, cur] = chosen
            done |= new & torch.isin(chosen, stop)
            if on_token is not None:
                _emit(on_token, new & ~done, chosen)
            done |= cur + 1 >= last
            prev = cur
            if done.all():
                break
    finally:
        model.clear_cache()
    if timings is not None:
        sync()
        timings.setdefault("prefill", time.perf_counter() - t0)
        timings["decode"] = time.perf_counter() - t0 - timings["prefill"]
    return _completions(tokens, lens, last, stop_ids)


def _emit(on_token, rows, chosen):
    """on_token(row, token) for each row in the mask rows (new tokens of rows not done)."""
    for row in rows.nonzero().flatten().tolist():
        on_token(row, chosen[row].item())


def _completions(tokens, lens, last, stop_ids):
    """Each row's new tokens, up to (not including) its first stop token."""
    rows = [tokens[i, n : int(last[i])].tolist() for i, n in enumerate(lens)]
    return [row[: next((j for j, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]


def _check_lengths(lens, context):
    if min(lens) == 0:
        raise ValueError("a prompt is empty (it needs at least the BOS token)")
    if max(lens) >= context:
        raise ValueError(f"a prompt of {max(lens)} tokens does not fit the context of {context} "
                         f"tokens (--max_seq_len); shorten it")


def _prompt_rows(prompts, total, device):
    """(B, total) token ids with each prompt at the start of its row, and a mask of where they are."""
    tokens = torch.zeros(len(prompts), total, dtype=torch.long, device=device)
    is_prompt = torch.zeros(len(prompts), total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p[:total], dtype=torch.long)
        is_prompt[i, : len(p)] = True
    return tokens, is_prompt


def loaded_as(model, device):
    """The dtypes the model holds and computes in, and on a CPU what runs one token's products."""
    weights = model.tok_embeddings.weight.dtype
    return cpu_paths.describe(weights, model.compute_dtype or weights) if device == "cpu" else str(weights)


def compile_decode_step(model):
    """torch.compile model.decode for the one-token steps. Its shapes never change (the KV cache is
    preallocated and attended whole, behind a mask), so it compiles once; on CUDA,
    mode="reduce-overhead" also captures it as a CUDA graph, removing the per-kernel launch cost that
    dominates batch-1 decoding. Inductor fuses the norm/RoPE/SwiGLU chains itself, so the step runs
    the PyTorch twins of the Triton kernels: it picks them for its own calls only, leaving the
    process-wide choice (model.set_kernels) as it was."""
    mode = "reduce-overhead" if model.tok_embeddings.weight.is_cuda else None
    compiled = torch.compile(model.decode, mode=mode, fullgraph=True, dynamic=False)

    def step(tokens, start_pos):
        previous = set_kernels("torch")
        try:
            return compiled(tokens, start_pos)
        finally:
            set_kernels(previous)

    return step


def completion_text(tok, prompt, ids):
    """The text the new tokens add to the prompt. Decoded after the prompt, not alone: sentencepiece
    drops a word-initial space at the start of a decode, so " with" would print as "with"."""
    return tok.decode(list(prompt) + list(ids))[len(tok.decode(list(prompt))) :]


class Streamer:
    """Prints a completion as it grows. Decoding the whole tail each time (not token by token) keeps
    multi-byte characters and word-initial spaces right; a trailing U+FFFD means the last token
    ended mid-character, so that part waits for the next token."""

    def __init__(self, tok, prompt, out=sys.stdout):
        self.tok, self.out, self.printed = tok, out, 0
        self.context = list(prompt[-8:])  # a few prompt tokens are enough context for the spacing
        self.ids = list(self.context)
        self.offset = len(tok.decode(self.context))

    def __call__(self, row, token):
        self.ids.append(token)
        text = self.tok.decode(self.ids)[self.offset :]
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def finish(self):
        text = self.tok.decode(self.ids)[self.offset :]
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()


def checked_ckpt_dir(ckpt_dir):
    """--ckpt_dir (default: the demo model `python train.py` makes), checked before anything loads."""
    if ckpt_dir is None:
        if not os.path.isdir(DEMO_DIR):
            raise UserError("no --ckpt_dir given and no demo model in out/demo/model (run `python train.py` first)")
        ckpt_dir = DEMO_DIR
    if not os.path.isdir(atomic.readable(ckpt_dir)):  # a swap a crash interrupted is finished first
        raise UserError(f"--ckpt_dir {ckpt_dir}: no such checkpoint directory")
    return ckpt_dir


def _checked_inputs(ckpt_dir, prompt, prompts_file, chat, system):
    """The checkpoint directory and the prompt texts main's flags ask for, checked before any loading."""
    if prompt is not None and prompts_file is not None:
        raise UsageError("give --prompt or --prompts_file, not both")
    if system is not None and not chat:
        raise UsageError("--system only applies with --chat")
    ckpt_dir = os.path.expanduser(checked_ckpt_dir(ckpt_dir))
    if prompts_file is not None:
        return ckpt_dir, read_prompts(prompts_file)
    return ckpt_dir, [Prompt(None, prompt or "")]


class Prompt:
    """One prompt to complete: its record's id (None for plain text), and a text (laid out as a chat
    turn only with --chat) or the messages of an instruction or chat record (always a dialog)."""

    def __init__(self, id, text=None, messages=None):
        self.id, self.text, self.messages = id, text, messages

    def shown(self):
        """What the output line reports as the prompt: the text, or the last user message."""
        return self.text if self.messages is None else self.messages[-1]["content"]


def read_prompts(path):
    """The Prompts of a --prompts_file: one per line that is not blank, plain text, or JSONL
    (data.records.is_jsonl): {"id", "prompt"}, or an instruction or chat record laid out as
    data.prepare lays it out for training, up to the open assistant turn (data.records.prompt_of)."""
    found = list(records.lines(path, "--prompts_file"))
    if not found:
        raise records.RecordError(f"--prompts_file {path}: no prompts in it")
    if not records.is_jsonl(path, found[0][1]):
        return [Prompt(None, records.text_of(line, where)) for where, line in found]
    prompts = []
    for where, line in found:
        record = records.parse(line, where)
        prompts.append(Prompt(record.get("id"), *records.prompt_of(record, where)))
    return prompts


# Each flag's range, checked by cli before any work (the types come from main's annotations).
CHECKS = {"ckpt_dir": non_empty, "prompts_file": non_empty, "adapter": non_empty, "tokenizer": non_empty,
          "temperature": interval("[0, inf)"), "top_p": interval("(0, 1]"), "max_new_tokens": positive,
          "max_seq_len": positive, "device": torch_device, "dtype": one_of("bf16", "fp16", "fp32"),
          "quantize": one_of("nf4")}


def load_for_sampling(ckpt_dir, tokenizer=None, adapter=None, device="cpu", dtype=None, max_seq_len=None,
                      force=False, quantize=None):
    """(model, tokenizer) ready to sample: the tokenizer checked against the model's embedding, and
    an adapter, if given, checked against the base and merged in (for speed; on an NF4 base it
    stays beside it, since 4-bit weights cannot absorb it)."""
    tok = load_tokenizer(tokenizer or ckpt_dir)
    model = checkpoint.load(ckpt_dir, device=device, dtype=dtype, quantize=quantize, max_seq_len=max_seq_len)
    check_fits(tok, model.args.vocab_size, ckpt_dir)
    if adapter is not None:
        apply_adapter(model, tok, adapter, force, quantize)
    return model, tok


def apply_adapter(model, tok, adapter, force=False, quantize=None):
    """The adapter checked against the base and merged in (on an NF4 base it stays beside it)."""
    lora.load_adapter(model, adapter, force=force, tokenizer=tok)
    if quantize is None:
        lora.merge_lora(model)


def encode_prompts(tok, texts, chat, system):
    """Token ids of each prompt (a text or a Prompt): a document start, or with chat a dialog ending
    in an open assistant turn (Llama 2 markers typed into the text are refused:
    tokenizer.DialogError). A Prompt holding messages is always a dialog; --system goes first
    unless the record brings its own."""
    head = [{"role": "system", "content": system}] if system else []
    ids = []
    for p in texts:
        messages, text = (p.messages, p.text) if isinstance(p, Prompt) else (None, p)
        if messages is not None:
            ids.append(tok.encode_dialog((head if messages[0]["role"] != "system" else []) + messages))
        elif chat:
            ids.append(tok.encode_dialog(head + [{"role": "user", "content": text}]))
        else:
            ids.append(tok.encode(text, bos=True, eos=False))
    return ids


def main(ckpt_dir: str = None, prompt: str = None, prompts_file: str = None, adapter: str = None,
         chat: bool = False, system: str = None, temperature: float = 0.6, top_p: float = 0.9,
         max_new_tokens: int = 256, max_seq_len: int = None, seed: int = None, tokenizer: str = None,
         device: str = None, dtype: str = None, quantize: str = None, compile: bool = False,
         force: bool = False):
    """Sample completions.

    Args:
        ckpt_dir: Meta (params.json + consolidated.NN.pth) or HF (config.json + safetensors)
            checkpoint; default out/demo, the model `python train.py` makes.
        prompt: the text to complete (with --chat: the user's message). Default: an empty document.
        prompts_file: prompts completed as a batch, one JSON line out per prompt: one prompt per line,
            or JSONL ({"id", "prompt"}, or instruction / chat records as data.prepare reads them,
            laid out as dialogs; ids are kept in the output). JSONL when the name ends .jsonl,
            .ndjson or .json (any case) or the first line is a JSON object.
        adapter: a LoRA adapter directory saved by train.py (merged into the weights for speed).
        chat: lay the prompt out as a dialog (Llama 3 headers or Llama 2 [INST]) for instruct models.
        system: a system message for --chat.
        temperature: 0 is greedy; Meta's default 0.6.
        top_p: nucleus mass (Meta's semantics); 1.0 samples from the whole distribution.
        max_new_tokens: stop after this many new tokens per prompt.
        max_seq_len: the context (prompt + completion) to allocate; default the model's.
        seed: makes sampling reproducible.
        tokenizer: a tokenizer.model to use instead of the one in ckpt_dir.
        device: cuda or cpu (default: cuda when available).
        dtype: bf16, fp16 or fp32, for the weights and the compute (default bf16 on CUDA; on a
            CPU the weights as the checkpoint stores them, computed in that dtype where the CPU is
            fast at it, else in fp32: cpu_paths.py).
        quantize: nf4 holds the projections in 4-bit NF4 (QLoRA's format; a quarter of the memory).
        compile: torch.compile the decode step (and capture it as a CUDA graph on GPU): slower to
            start, faster per token.
        force: apply --adapter even to a base other than the one it was trained on.
    """
    ckpt_dir, texts = _checked_inputs(ckpt_dir, prompt, prompts_file, chat, system)
    device = device or common.default_device()
    t0 = time.perf_counter()
    model, tok = load_for_sampling(ckpt_dir, tokenizer, adapter, device, dtype, max_seq_len, force, quantize)
    print(f"loaded {ckpt_dir} in {time.perf_counter() - t0:.1f}s ({device}, {loaded_as(model, device)})", file=sys.stderr)
    prompts = encode_prompts(tok, texts, chat, system)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
        torch.manual_seed(seed)
    # --prompt streams its completion; a prompts file, even of one prompt, gives one JSON line per prompt
    streamer = Streamer(tok, prompts[0]) if prompts_file is None else None

    timings = {}
    if compile and device == "cpu":
        print("generate.py: note: --compile on a CPU decodes through torch.compile, which cannot use "
              "cpu_gemv.c's bf16 projection: eager decoding is usually faster there (BENCHMARKS.md)", file=sys.stderr)
    step = compile_decode_step(model) if compile else None
    completions = generate(model, prompts, max_new_tokens, temperature, top_p, tok.stop_ids, generator,
                           on_token=streamer, timings=timings, decode_step=step, n_words=tok.n_words)
    if streamer is not None:
        streamer.finish()
    else:
        print_json_lines(tok, texts, prompts, completions)
    note_context_cuts(prompts, completions, max_new_tokens, model.args.max_seq_len)
    print(rates_line(prompts, completions, timings, compiled=compile), file=sys.stderr)


def print_json_lines(tok, texts, prompts, completions):
    """One JSON line per prompt of a --prompts_file: its id (if its record had one), prompt and completion."""
    for p, prompt_ids, ids in zip(texts, prompts, completions):
        row = {"id": p.id} if p.id is not None else {}
        print(json.dumps({**row, "prompt": p.shown(), "completion": completion_text(tok, prompt_ids, ids)},
                         ensure_ascii=False))


def note_context_cuts(prompts, completions, max_new_tokens, context):
    """One stderr line when the context, not a stop token or --max_new_tokens, ended completions."""
    cut = [i for i, (p, ids) in enumerate(zip(prompts, completions))
           if len(ids) < max_new_tokens and len(p) + len(ids) >= context]
    if cut:
        which = f"prompt {cut[0] + 1}" if len(prompts) == 1 or len(cut) == 1 else f"{len(cut)} prompts"
        got = f"{len(completions[cut[0]])} of {max_new_tokens}" if len(cut) == 1 else f"fewer than {max_new_tokens}"
        print(f"generate.py: note: {which} stopped at the context of {context} tokens after {got} new tokens "
              f"(--max_seq_len, or a shorter prompt, gives more room)", file=sys.stderr)


def rates_line(prompts, completions, timings, compiled=False):
    """The stderr timing line. The prompt pass yields each completion's first token, so the decode
    rate counts only the tokens after it; with none (one-token runs) it says so rather than 0/s.
    compiled: the first step compiled the decode step, so its time and tokens are left out of the
    rate and shown apart."""
    n_prompt, n_new = sum(map(len, prompts)), sum(map(len, completions))
    prefill = max(timings["prefill"], 1e-9)
    line = f"prompt: {n_prompt} tokens in {timings['prefill']:.2f}s ({n_prompt / prefill:.1f} tokens/s)"
    stepped, decode, skipped = n_new - sum(1 for ids in completions if ids), timings["decode"], ""
    if compiled and "first_step" in timings:
        stepped -= sum(1 for ids in completions if len(ids) > 1)
        decode -= timings["first_step"]
        skipped = f", after {timings['first_step']:.2f}s compiling in the first step"
    if stepped <= 0:
        return line + f"; decode: {n_new} token(s), all from the prompt pass (no decode steps to time{skipped})"
    return line + (f"; decode: {n_new} tokens in {timings['decode']:.2f}s "
                   f"({stepped / max(decode, 1e-9):.1f} tokens/s after the first{skipped})")


if __name__ == "__main__":
    run(main, prog="generate.py", checks=CHECKS)
