"""Fine-tuning: GLUE and own-data files, the training task, export parity, CLI."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, sentence, tiny_finetune, write_sst2

from bertforge.commands.finetune import predict, run_finetune
from bertforge.commands.glue import load_glue_task, markdown_table, present_tasks
from bertforge.config import DataConfig, ModelConfig, RunConfig, TrainConfig, preset
from bertforge.data.labelled import TaskData, load_own_task
from bertforge.errors import BertforgeError
from bertforge.tasks.classification import ClassificationTask, TokenizedSplit
from bertforge.testing import NOUNS

SHARED_GLUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"


def write_stsb(folder: Path, n: int = 24) -> Path:
    """STS-B's layout: 10 columns, sentence1/sentence2 at 7 and 8, the score last."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    header = (
        "\t".join(
            (
                "index genre filename year old_index source1 source2 sentence1 sentence2 score"
            ).split()
        )
        + "\n"
    )
    for split in ("train", "dev"):
        rows = []
        for i in range(n):
            (a, ya), (b, yb) = sentence(rng), sentence(rng)
            rows.append(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{2.5 * (ya + yb):.3f}\n")
        (folder / f"{split}.tsv").write_text(header + "".join(rows))
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir) -> Path:
    """A tiny pretrained run (a few MLM steps): a bertforge run directory to fine-tune."""
    from bertforge.commands.pretrain import run_pretrain

    model = preset(
        "tiny",
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    cfg = RunConfig(
        model=model,
        data=DataConfig(seq_len=32),
        train=TrainConfig(
            batch_size=16,
            micro_batch_size=16,
            lr=2e-3,
            max_steps=3,
            eval_every=0,
            eval_sequences=16,
            precision="fp32",
        ),
    )
    run = tmp_path_factory.mktemp("pretrained") / "run"
    run_pretrain(run, cfg, data_dir=data_dir, show_progress=False)
    return run


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory, tiny_run) -> tuple[Path, Path]:
    """(OUT, the task's directory) of a fine-tuned synthetic SST-2."""
    task_dir = write_sst2(tmp_path_factory.mktemp("glue") / "SST-2")
    out = tmp_path_factory.mktemp("finetuned") / "sst2"
    run_finetune(
        tiny_run, load_glue_task("sst2", task_dir), out, tiny_finetune(), show_progress=False
    )
    return out, task_dir


# ---------------------------------------------------------------------------- task files


def test_glue_single_sentence_with_and_without_header(tmp_path):
    with_header = load_glue_task("sst2", write_sst2(tmp_path / "a" / "SST-2"))
    without = load_glue_task("SST-2", write_sst2(tmp_path / "b", header=False))
    assert len(with_header.train) == len(without.train) == 128
    assert with_header.train.texts == without.train.texts
    assert with_header.train.y.tolist() == without.train.y.tolist()
    # CoLA as distributed: no header, 4 columns (source, label, mark, sentence).
    cola = tmp_path / "glue" / "CoLA"
    cola.mkdir(parents=True)
    for split in ("train", "dev"):
        (cola / f"{split}.tsv").write_text(
            "gj04\t1\t\tThe cat sees the dog.\ngj04\t0\t*\tCat the dog sees.\n"
        )
    data = load_glue_task("cola", tmp_path / "glue")
    assert data.train.texts == ["The cat sees the dog.", "Cat the dog sees."]
    assert data.train.y.tolist() == [1, 0] and data.metrics == ("matthews",)
    assert present_tasks(tmp_path / "glue") == ["cola"]


def test_glue_columns_read_by_header_name(tmp_path):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    for split in ("train", "dev"):  # columns in another order than GLUE's
        (folder / f"{split}.tsv").write_text(
            "label\tsentence\n1\tthe happy cat .\n0\tthe dark dog .\n"
        )
    data = load_glue_task("sst2", folder)
    assert data.train.texts == ["the happy cat .", "the dark dog ."]
    assert data.train.y.tolist() == [1, 0]


def test_glue_pair_tasks_and_regression(tmp_path):
    mrpc = tmp_path / "MRPC"
    mrpc.mkdir()
    for split in ("train", "dev"):  # MRPC ships with a byte-order mark
        (mrpc / f"{split}.tsv").write_text(
            "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
            '1\t1\t2\tThe cat sat.\tA cat sat.\n0\t3\t4\tA "quoted" dog.\tThe river.\n',
            encoding="utf-8",
        )
    data = load_glue_task("mrpc", tmp_path)
    assert data.train.pairs == ["A cat sat.", "The river."]
    assert data.train.texts[1] == 'A "quoted" dog.' and data.metrics == ("accuracy", "f1")
    stsb = load_glue_task("sts-b", write_stsb(tmp_path / "STS-B"))
    assert stsb.regression and stsb.train.y.dtype == np.float32 and len(stsb.train.pairs) == 24
    mnli = tmp_path / "MNLI"
    mnli.mkdir()
    head = (
        "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\t"
        "label1\tgold_label\n"
    )
    row = "0\t1\t1\tfiction\t-\t-\t-\t-\tA cat.\tA dog.\tneutral\t{}\n"
    (mnli / "train.tsv").write_text(head + row.format("neutral") + row.format("entailment"))
    (mnli / "dev_matched.tsv").write_text(head + row.format("contradiction"))
    (mnli / "dev_mismatched.tsv").write_text(head + row.format("entailment"))
    data = load_glue_task("mnli", mnli)
    assert list(data.validation) == ["matched", "mismatched"]
    assert data.labels == ["contradiction", "entailment", "neutral"]
    assert data.train.y.tolist() == [2, 1] and data.validation["matched"].y.tolist() == [0]


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "empty file"),
        ("sentence\tlabel\n", "no examples"),
        ("sentence\tlabel\nthe cat .\t1\nthe dog .\t1\textra\n", "line 3: 3 fields, expected 2"),
        (
            "sentence\tlabel\nthe cat .\t1\nthe dog .\tpositive\n",
            "line 3: unknown label 'positive'",
        ),
    ],
)
def test_malformed_glue_files_name_file_and_line(tmp_path, content, match):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "train.tsv").write_text(content)
    (folder / "dev.tsv").write_text("sentence\tlabel\nthe cat .\t1\n")
    with pytest.raises(BertforgeError, match=match) as e:
        load_glue_task("sst2", folder)
    assert "train.tsv" in str(e.value)


def test_own_data_formats_and_errors(tmp_path):
    (tmp_path / "train.csv").write_text(
        'text,label\n"the happy cat, again",pos\nthe dog,neg\nthe bird,pos\n'
    )
    (tmp_path / "valid.jsonl").write_text(
        '{"text": "a cat", "label": "neg"}\n\n{"text": "a dog", "label": "pos"}\n'
    )
    data = load_own_task(tmp_path / "train.csv", tmp_path / "valid.jsonl", "text", "label")
    assert data.labels == ["neg", "pos"] and data.train.texts[0] == "the happy cat, again"
    assert data.train.y.tolist() == [1, 0, 1] and data.validation[""].y.tolist() == [0, 1]
    (tmp_path / "bad.jsonl").write_text(
        '{"text": "a", "label": "pos"}\n{"text": "b", "label": "maybe"}\n'
    )
    with pytest.raises(BertforgeError, match=r"bad.jsonl, line 2: unknown label 'maybe'"):
        load_own_task(tmp_path / "train.csv", tmp_path / "bad.jsonl", "text", "label")
    with pytest.raises(BertforgeError, match=r"train.csv, line 1: no column 'sentence'"):
        load_own_task(tmp_path / "train.csv", tmp_path / "valid.jsonl", "sentence", "label")
    (tmp_path / "short.csv").write_text("text,label\nthe cat,pos\nthe dog\n")
    with pytest.raises(BertforgeError, match=r"short.csv, line 3: 1 fields, but the header"):
        load_own_task(tmp_path / "short.csv", tmp_path / "valid.jsonl", "text", "label")
    (tmp_path / "r.tsv").write_text("s\ty\nthe cat\t0.5\nthe dog\tabc\n")
    with pytest.raises(BertforgeError, match=r"r.tsv, line 3: label 'abc' is not a number"):
        load_own_task(tmp_path / "r.tsv", tmp_path / "r.tsv", "s", "y", regression=True)


def test_real_glue_files_parse():
    """The GLUE files as distributed (SST-2 with a header, CoLA without): parsing only."""
    if not (SHARED_GLUE / "SST-2").is_dir() or not (SHARED_GLUE / "CoLA").is_dir():
        pytest.skip(
            f"GLUE SST-2 and CoLA are not present ({SHARED_GLUE.name}/ beside this "
            "repository, under shared/data); this test reads the real files"
        )
    sst2, cola = load_glue_task("sst2", SHARED_GLUE), load_glue_task("cola", SHARED_GLUE)
    assert (len(sst2.train), len(sst2.validation[""])) == (67349, 872)
    assert (len(cola.train), len(cola.validation[""])) == (8551, 1043)
    for data in (sst2, cola):
        assert set(data.train.y.tolist()) == {0, 1}
        assert all(data.train.texts) and all(data.validation[""].texts)
    assert present_tasks(SHARED_GLUE)[:2] == ["cola", "sst2"]


# ------------------------------------------------------------------------------ training


def metrics_lines(out: Path, kind: str) -> list[dict]:
    return [
        r
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == kind
    ]


def test_loss_falls_and_best_epoch_is_exported(sst2_run):
    sst2_run, task_dir = sst2_run
    losses = [r["loss"] for r in metrics_lines(sst2_run, "train")]
    assert len(losses) == 48  # 3 epochs of ceil(128 / 8) steps
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.3, losses
    summary = json.loads((sst2_run / "metrics.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [1.0, 2.0, 3.0]
    scores = [e["score"] for e in summary["epochs"]]
    assert summary["score"] == max(scores) > 0.9
    assert summary["best_epoch"] == summary["epochs"][int(np.argmax(scores))]["epoch"]
    assert summary["task"] == "sst2" and summary["wall_time_s"] > 0
    assert {"accuracy", "eval_loss"} <= set(summary["best"])
    # The export is the best epoch's model: it scores the best epoch's accuracy.
    rows = [line.split("\t") for line in (task_dir / "dev.tsv").read_text().splitlines()[1:]]
    predicted = predict(sst2_run, [r[0] for r in rows])
    # GLUE's labels by their names: SST-2's 0/1 are negative/positive.
    assert {p["label"] for p in predicted} <= {"negative", "positive"}
    named = {"0": "negative", "1": "positive"}
    got = np.mean([p["label"] == named[r[1]] for p, r in zip(predicted, rows)])
    assert got == pytest.approx(summary["best"]["accuracy"])


class _Scripted(torch.nn.Module):
    """A 'model' whose validation predictions are right or wrong on demand."""

    num_labels = 2

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.right = True

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        # The label is the last real token's parity in this test's data.
        last = input_ids[:, 1] % 2 if self.right else 1 - input_ids[:, 1] % 2
        return torch.nn.functional.one_hot(last, 2).float()


def test_tokens_count_the_real_tokens_trained_on(sst2_run):
    """`tokens` is real input tokens, padding excluded, as in pretraining."""
    from bertforge.data.tokenizer import load_truncating_tokenizer

    sst2_run, task_dir = sst2_run
    data = load_glue_task("sst2", task_dir)
    tok = load_truncating_tokenizer(sst2_run / "tokenizer", 32)
    lengths = sum(len(tok.encode(t).ids) for t in data.train.texts)
    assert metrics_lines(sst2_run, "train")[-1]["tokens"] == 3 * lengths  # 3 epochs


def test_a_run_shorter_than_an_epoch_records_its_last_step_as_best(tmp_path, tiny_run):
    """max_steps not a multiple of the epoch (16 steps): the best is step 5, not 6."""
    data = load_glue_task("sst2", write_sst2(tmp_path / "SST-2"))
    summary = run_finetune(
        tiny_run, data, tmp_path / "out", tiny_finetune(max_steps=5), show_progress=False
    )
    assert summary["steps"] == summary["best_step"] == 5
    assert [e["epoch"] for e in summary["epochs"]] == [round(5 / 16, 4)]


def test_the_training_options_of_pretraining_reach_fine_tuning(tmp_path, tiny_run, capsys):
    """FinetuneConfig is composed from TrainConfig: schedule, Adam betas, on_nan, compile..."""
    task_dir = write_sst2(tmp_path / "SST-2")
    code, _, err = run_cli(
        capsys,
        "finetune",
        tiny_run,
        "--task",
        "sst2",
        "--data-dir",
        task_dir,
        "--out",
        tmp_path / "out",
        "--max-steps",
        "2",
        "--schedule",
        "cosine",
        "--adam-beta2",
        "0.98",
        "--on-nan",
        "skip",
        "--warmup-steps",
        "1",
        "--max-length",
        "32",
        "--quiet",
    )
    assert code == 0, err
    spec = json.loads((tmp_path / "out" / "finetune.json").read_text())["config"]
    assert spec["train"]["schedule"] == "cosine" and spec["train"]["adam_beta2"] == 0.98
    assert spec["train"]["on_nan"] == "skip" and spec["train"]["warmup_steps"] == 1
    assert spec["train"]["lr"] == 2e-5 and spec["max_length"] == 32  # fine-tuning's default
    # --resume with the same flags is accepted; with another schedule refused.
    args = [
        "finetune",
        tiny_run,
        "--task",
        "sst2",
        "--data-dir",
        task_dir,
        "--out",
        tmp_path / "out",
        "--max-length",
        "32",
        "--quiet",
        "--resume",
    ]
    assert run_cli(capsys, *args, "--schedule", "cosine")[0] == 0
    code, _, err = run_cli(capsys, *args, "--schedule", "linear")
    assert code == 2 and "schedule was 'cosine'" in err


def test_best_epoch_weights_are_kept(tmp_path, tokenizer_dir):
    """A later, worse epoch does not replace the best one's weights."""
    from bertforge.data.tokenizer import load_truncating_tokenizer

    tok = load_truncating_tokenizer(tokenizer_dir, 16)
    texts = ["cat", "dog", "bird", "horse"]
    ids = [tok.encode(t).ids[1] for t in texts]
    y = np.array([i % 2 for i in ids])
    data = TaskData(
        name="t",
        train=None,
        validation={},
        labels=["0", "1"],
        metrics=("accuracy",),
        score=("accuracy",),
    )
    valid = TokenizedSplit(tok, texts, None, y, 0)
    task = ClassificationTask(
        data,
        valid,
        {"": valid},
        tiny_finetune(batch_size=2),
        torch.device("cpu"),
        tmp_path / "best",
    )
    model = _Scripted()
    for step, right, weight in ((2, True, 1.0), (4, False, 2.0), (6, True, 3.0)):
        model.right = right
        with torch.no_grad():
            model.weight.fill_(weight)
        assert task.evaluate(model, step)["accuracy"] == (1.0 if right else 0.0)
        best = json.loads((tmp_path / "best" / "state.json").read_text())
        assert best["step"] == 2  # the equal score at step 6 does not replace it either
    from safetensors.torch import load_file

    assert [p.name for p in (tmp_path / "best").glob("*.safetensors")] == [best["weights"]]
    assert load_file(str(tmp_path / "best" / best["weights"]))["weight"].item() == 1.0


def test_batches_are_a_pure_function_of_the_step(tmp_path, tokenizer_dir):
    """Every example once an epoch; length grouping pads less and keeps that."""
    from bertforge.data.tokenizer import load_truncating_tokenizer

    tok = load_truncating_tokenizer(tokenizer_dir, 32)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(NOUNS) for _ in range(rng.randint(1, 20))) for _ in range(100)]
    train = TokenizedSplit(tok, texts, None, np.zeros(100, dtype=np.int64), 0)
    data = TaskData(
        name="t",
        train=None,
        validation={},
        labels=["0", "1"],
        metrics=("accuracy",),
        score=("accuracy",),
    )

    def epoch(grouping: int) -> tuple[list[list[int]], int]:
        task = ClassificationTask(
            data,
            train,
            {},
            tiny_finetune(batch_size=8, micro_batch_size=4, length_grouping=grouping),
            torch.device("cpu"),
            tmp_path / "best",
        )
        assert task.steps_per_epoch == 13  # ceil(100 / 8); the last batch holds 4
        rows, padded = [], 0
        for step in range(13):
            for micro in task.batch(step).micro:
                rows += [micro.input_ids[i].tolist() for i in range(len(micro.y))]
                padded += micro.input_ids.numel()
        return rows, padded

    plain, plain_padded = epoch(0)
    assert plain == epoch(0)[0]  # the same seed, the same batches
    grouped, grouped_padded = epoch(4)
    key = sorted([r for r in row if r] for row in plain)  # unpadded rows, as a multiset
    assert sorted([r for r in row if r] for row in grouped) == key and len(grouped) == 100
    assert grouped_padded < 0.8 * plain_padded


def test_regression_pair_task_and_resume(tmp_path, tiny_run):
    data = load_glue_task("stsb", write_stsb(tmp_path / "STS-B"))
    cfg = tiny_finetune(epochs=2, batch_size=8, micro_batch_size=4, keep_last=2)
    full, half = tmp_path / "full", tmp_path / "half"
    summary = run_finetune(tiny_run, data, full, cfg, show_progress=False)
    assert {"pearson", "spearman", "eval_loss"} <= set(summary["best"])
    assert json.loads((full / "hf" / "config.json").read_text())["problem_type"] == "regression"
    # Resume from the epoch-1 checkpoint: the same losses as the uninterrupted run.
    shutil.copytree(full, half)
    shutil.rmtree(half / "checkpoints" / "step-000006")  # as if killed in epoch 2
    run_finetune(tiny_run, data, half, cfg, resume=True, show_progress=False)
    assert [r["loss"] for r in metrics_lines(half, "train")] == [
        r["loss"] for r in metrics_lines(full, "train")
    ]
    with pytest.raises(BertforgeError, match="already holds a fine-tuning run"):
        run_finetune(tiny_run, data, full, cfg, show_progress=False)


def test_fine_tuning_does_not_depend_on_the_micro_batch_size(tmp_path, tiny_run):
    """Each micro-batch is padded to its own longest example and the loss normalised over
    the whole batch: splitting a batch changes the padding, not the result (fp32)."""
    data = load_glue_task("sst2", write_sst2(tmp_path / "SST-2"))
    runs = {}
    for micro in (8, 2):
        runs[micro] = run_finetune(
            tiny_run,
            data,
            tmp_path / f"micro-{micro}",
            tiny_finetune(epochs=1, micro_batch_size=micro),
            show_progress=False,
        )
    a, b = (metrics_lines(tmp_path / f"micro-{m}", "train") for m in (8, 2))
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < 1e-5
    assert runs[8]["best"]["eval_loss"] == pytest.approx(runs[2]["best"]["eval_loss"], abs=1e-5)
    assert runs[8]["score"] == runs[2]["score"]


def test_from_scratch_starts_from_random_weights(tmp_path, tiny_run):
    from safetensors.torch import load_file

    data = load_glue_task("sst2", write_sst2(tmp_path / "SST-2", train=16, dev=8))
    run_finetune(
        tiny_run, data, tmp_path / "pre", tiny_finetune(max_steps=1, lr=1e-9), show_progress=False
    )
    run_finetune(
        tiny_run,
        data,
        tmp_path / "scratch",
        tiny_finetune(max_steps=1, lr=1e-9),
        from_scratch=True,
        show_progress=False,
    )
    key = "bert.embeddings.word_embeddings.weight"
    pretrained = load_file(str(tiny_run / "hf" / "model.safetensors"))[key]
    assert torch.allclose(
        load_file(str(tmp_path / "pre" / "hf" / "model.safetensors"))[key], pretrained, atol=1e-6
    )
    scratch = load_file(str(tmp_path / "scratch" / "hf" / "model.safetensors"))[key]
    assert scratch.shape == pretrained.shape and not torch.allclose(scratch, pretrained)
    summary = json.loads((tmp_path / "scratch" / "metrics.json").read_text())
    assert summary["from_scratch"] is True


def test_finetune_a_transformers_directory_with_only_vocab_txt(tmp_path, tokenizer_dir):
    """A Hugging Face BERT directory as transformers writes it, tokenizer as vocab.txt."""
    transformers = pytest.importorskip("transformers")
    vocab = (tokenizer_dir / "vocab.txt").read_text().splitlines()
    torch.manual_seed(0)
    hf = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    hf.save_pretrained(tmp_path / "bert")
    shutil.copy(tokenizer_dir / "vocab.txt", tmp_path / "bert" / "vocab.txt")
    data = load_glue_task("sst2", write_sst2(tmp_path / "SST-2", train=16, dev=8))
    summary = run_finetune(
        tmp_path / "bert", data, tmp_path / "out", tiny_finetune(epochs=1), show_progress=False
    )
    assert summary["steps"] == 2 and (tmp_path / "out" / "hf" / "vocab.txt").is_file()
    # The export carries a tokenizer.json built from vocab.txt; transformers reads both alike.
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out" / "hf"))
    slow = transformers.BertTokenizer.from_pretrained(str(tmp_path / "bert"))  # vocab.txt
    text = "The happy cat sees the dog ."
    assert hf_tok(text)["input_ids"] == slow(text)["input_ids"]
    assert len(predict(tmp_path / "out", ["the happy cat ."])) == 1


# -------------------------------------------------------------------------------- export


@pytest.mark.parametrize("labels", [["neg", "pos", "neutral"], None])
def test_classifier_export_matches_transformers(tmp_path, labels):
    transformers = pytest.importorskip("transformers")
    from bertforge.hf import classifier_config_to_hf, export_model, import_classifier
    from bertforge.model.bert import BertForSequenceClassification

    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    model = BertForSequenceClassification(config, len(labels) if labels else 1).eval()
    export_model(model, tmp_path, extra_config=classifier_config_to_hf(labels))
    theirs, info = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert theirs.config.problem_type == (
        "regression" if labels is None else "single_label_classification"
    )
    if labels:
        assert theirs.config.id2label == dict(enumerate(labels))
    ids = torch.randint(0, 99, (3, 10), generator=torch.Generator().manual_seed(0))
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ours = model(ids, types, mask)
        torch.testing.assert_close(
            theirs.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask).logits,
            ours,
            atol=1e-5,
            rtol=1e-5,
        )
        again, _ = import_classifier(tmp_path)
        torch.testing.assert_close(again(ids, types, mask), ours, atol=0, rtol=0)


# ----------------------------------------------------------------------------------- CLI


def test_cli_own_data_finetune_and_predict(capsys, tmp_path, tiny_run):
    rng = random.Random(3)
    for name, n in (("train", 48), ("valid", 16)):
        lines = []
        for _ in range(n):
            text, y = sentence(rng)
            lines.append(json.dumps({"review": text, "sentiment": ["bad", "good"][y]}))
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys,
        "finetune",
        tiny_run,
        "--train",
        tmp_path / "train.jsonl",
        "--validation",
        tmp_path / "valid.jsonl",
        "--text-column",
        "review",
        "--label-column",
        "sentiment",
        "--out",
        out,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "32",
        "--lr",
        "1e-3",
        "--precision",
        "fp32",
        "--quiet",
    )
    assert code == 0, err
    assert json.loads(stdout)["task"] == "train"
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "bad", "1": "good"}
    assert config["label2id"] == {"bad": 0, "good": 1}
    (tmp_path / "in.txt").write_text("the happy cat sees the dog .\nthe dark king finds it .\n")
    code, stdout, err = run_cli(capsys, "predict", out, "--input", tmp_path / "in.txt")
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert len(rows) == 2 and all(r["label"] in ("bad", "good") for r in rows)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    code, _, _ = run_cli(
        capsys,
        "predict",
        out / "hf",
        "--input",
        tmp_path / "valid.jsonl",
        "--text-column",
        "review",
        "--output",
        tmp_path / "p.jsonl",
    )
    assert code == 0 and len((tmp_path / "p.jsonl").read_text().splitlines()) == 16


def test_cli_glue_table(capsys, tmp_path, tiny_run):
    write_sst2(tmp_path / "glue" / "SST-2", train=32, dev=16)
    write_stsb(tmp_path / "glue" / "STS-B", n=16)
    code, stdout, err = run_cli(
        capsys,
        "glue",
        tiny_run,
        "--data-dir",
        tmp_path / "glue",
        "--out",
        tmp_path / "runs",
        "--epochs",
        "1",
        "--max-length",
        "32",
        "--precision",
        "fp32",
        "--quiet",
        "--results",
        tmp_path / "glue.json",
    )
    assert code == 0, err
    assert "| SST-2 | accuracy" in stdout and "| STS-B | pearson" in stdout
    assert "**Average**" in stdout
    results = json.loads((tmp_path / "glue.json").read_text())
    assert set(results["tasks"]) == {"sst2", "stsb"}
    assert results["average"] == pytest.approx(
        np.mean([r["score"] for r in results["tasks"].values()])
    )
    assert markdown_table(results) in stdout
    assert (tmp_path / "runs" / "sst2" / "hf" / "config.json").is_file()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["finetune", "{run}", "--out", "{tmp}/o"], "give --task NAME --data-dir DIR"),
        (
            ["finetune", "{run}", "--task", "sst9", "--data-dir", "{tmp}/good", "--out", "{tmp}/o"],
            "unknown GLUE task 'sst9'",
        ),
        (
            ["finetune", "{run}", "--task", "sst2", "--data-dir", "{tmp}/bad", "--out", "{tmp}/o"],
            "train.tsv, line 3: 1 fields, expected 2",
        ),
        (
            "finetune {run} --task sst2 --data-dir {tmp}/bad --out {tmp}/o --lr 0".split(),
            "argument --lr: '0': must be > 0",
        ),
        (
            "finetune {tmp}/nope --task sst2 --data-dir {tmp}/good --out {tmp}/o".split(),
            "model not found",
        ),
        (["predict", "{tmp}/nope", "--input", "{tmp}/x.txt"], "no config.json"),
        (["glue", "{run}", "--data-dir", "{tmp}/empty"], "no GLUE task directories"),
    ],
)
def test_cli_errors_are_one_line(capsys, tmp_path, tiny_run, argv, match):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.tsv").write_text("sentence\tlabel\nthe cat\t1\nthe dog\n")
    (tmp_path / "bad" / "dev.tsv").write_text("sentence\tlabel\nthe cat\t1\n")
    write_sst2(tmp_path / "good", train=4, dev=4)
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.txt").write_text("the cat\n")
    subs = {"tmp": str(tmp_path), "run": str(tiny_run)}
    code, _, err = run_cli(capsys, *(a.format(**subs) for a in argv))
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0]
