"""GLUE task registry and TSV reader: the 9 download-script layouts, malformed rows, hub fallback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dynaflow.data import glue
from dynaflow.data.glue import (
    TASKS,
    GlueFileNotFoundError,
    HubUnavailableError,
    MalformedDataError,
    find_glue_dir,
    get_task,
    load_from_hub,
    load_split,
    read_split,
)

MNLI_HEAD = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2"
)


def _write(root: Path, task_dir: str, split: str, lines: list[str], *, bom: bool = False,
           trailing_newline: bool = True) -> Path:
    path = root / task_dir / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + ("\n" if trailing_newline else "")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def _mnli_row(i: int, s1: str, s2: str, gold: str, dev: bool) -> str:
    parses = "\t".join(["( x )", "( y )", "(ROOT x)", "(ROOT y)"])
    # Annotator columns deliberately differ from gold_label so reading the wrong column is caught.
    other = "entailment" if gold != "entailment" else "neutral"
    annot = "\t".join([other] * (5 if dev else 1))
    return f"{i}\t{1000 + i}\t{1000 + i}n\tfiction\t{parses}\t{s1}\t{s2}\t{annot}\t{gold}"


# --- Registry ------------------------------------------------------------------------------------


def test_registry_has_the_nine_tasks_with_expected_specs():
    assert set(TASKS) == {"sst2", "cola", "stsb", "mrpc", "rte", "qnli", "mnli", "qqp", "wnli"}
    assert {t.dir_name for t in TASKS.values()} == {
        "SST-2", "CoLA", "STS-B", "MRPC", "RTE", "QNLI", "MNLI", "QQP", "WNLI"
    }
    assert {t.hub_config for t in TASKS.values()} == set(TASKS)
    assert all(t.hub_id == "nyu-mll/glue" for t in TASKS.values())
    stsb = TASKS["stsb"]
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.main_metric == "pearson"
    assert TASKS["cola"].main_metric == "mcc"
    assert TASKS["mrpc"].main_metric == "acc" and "f1" in TASKS["mrpc"].metric_names
    assert TASKS["qqp"].main_metric == "acc" and "acc_and_f1" in TASKS["qqp"].metric_names
    mnli = TASKS["mnli"]
    assert mnli.labels == ("contradiction", "entailment", "neutral") and mnli.num_labels == 3
    assert mnli.dev_splits == ("dev_matched", "dev_mismatched") and mnli.main_dev_split == "dev_matched"
    assert TASKS["rte"].labels == TASKS["qnli"].labels == ("entailment", "not_entailment")
    assert TASKS["sst2"].labels == ("0", "1") and not TASKS["sst2"].has_text_pair
    assert TASKS["qnli"].has_text_pair
    for t in TASKS.values():
        assert t.main_metric == t.metric_names[0]
        assert t.num_labels == (1 if t.is_regression else len(t.labels))


@pytest.mark.parametrize(
    "alias, expected",
    [("SST-2", "sst2"), ("sst-2", "sst2"), ("sst2", "sst2"), ("CoLA", "cola"), ("STS-B", "stsb"),
     ("sts-b", "stsb"), ("MNLI-MM", "mnli"), ("mnli-mm", "mnli"), (" QQP ", "qqp"), ("WNLI", "wnli")],
)
def test_get_task_aliases(alias, expected):
    assert get_task(alias).name == expected


def test_get_task_unknown_lists_allowed_names():
    with pytest.raises(ValueError) as ei:
        get_task("sst-5")
    msg = str(ei.value)
    assert "sst-5" in msg
    for name in TASKS:
        assert name in msg


# --- Layouts: one small file per task, with the real header/column structure ----------------------


def test_sst2(tmp_path):
    _write(tmp_path, "SST-2", "train", ["sentence\tlabel", "a charming film \t1", "dull , dull \t0"])
    d = read_split("sst2", tmp_path, "train")
    assert d.text_a == ["a charming film", "dull , dull"] and d.text_b is None
    assert d.labels == [1, 0] and d.n_skipped == 0 and len(d) == 2
    assert d.source.endswith(os.path.join("SST-2", "train.tsv"))


def test_cola_no_header_and_no_trailing_newline(tmp_path):
    rows = ["gj04\t1\t\tThe sailors rode the breeze.", "gj04\t0\t*\tThe more books.", "cj99\t1\t\tLast one."]
    _write(tmp_path, "CoLA", "dev", rows, trailing_newline=False)
    d = read_split("CoLA", tmp_path, "dev")
    # First line is data (no header); last line present despite the missing final "\n".
    assert d.text_a == ["The sailors rode the breeze.", "The more books.", "Last one."]
    assert d.labels == [1, 0, 1] and d.text_b is None


def test_stsb_scores_and_quotes_kept(tmp_path):
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rows = [
        head,
        '0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is "taking" off.\t'
        "A plane flies.\t5.000",
        "1\tmain-news\theadlines\t2015\t0002\tnone\tnone\tA\tB\t0",
        "2\tmain-forums\tanswers\t2016\t0003\tnone\tnone\t\"unbalanced quote\tC\t3.8",
    ]
    _write(tmp_path, "STS-B", "dev", rows)
    d = read_split("STS-B", tmp_path, "dev")
    # Split on tab only: a lone '"' must not swallow the next columns as CSV quoting would.
    assert d.text_a == ['A plane is "taking" off.', "A", '"unbalanced quote']
    assert d.text_b == ["A plane flies.", "B", "C"]
    assert d.labels == [5.0, 0.0, 3.8] and all(isinstance(x, float) for x in d.labels)


def test_mrpc_bom(tmp_path):
    rows = [
        "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        "1\t702876\t702977\tAmrozi accused his brother.\tReferring to him, Amrozi accused.",
        "0\t2108705\t2108831\tYucaipa owned Dominick's.\tYucaipa bought Dominick's.",
    ]
    path = _write(tmp_path, "MRPC", "train", rows, bom=True)
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    d = read_split("mrpc", tmp_path, "train")
    assert d.labels == [1, 0]
    assert d.text_a == ["Amrozi accused his brother.", "Yucaipa owned Dominick's."]
    assert d.text_b == ["Referring to him, Amrozi accused.", "Yucaipa bought Dominick's."]


def test_rte(tmp_path):
    rows = ["index\tsentence1\tsentence2\tlabel", "0\tDana Reeve died.\tChristopher Reeve had an accident.\t"
            "not_entailment", "1\tYet, we now are.\tBacteria is winning.\tentailment"]
    _write(tmp_path, "RTE", "dev", rows)
    d = read_split("rte", tmp_path, "dev")
    assert d.labels == [1, 0]
    assert d.text_a[0] == "Dana Reeve died." and d.text_b[1] == "Bacteria is winning."


def test_qnli(tmp_path):
    rows = ["index\tquestion\tsentence\tlabel",
            "0\tWhat came into force?\tThe law came into force.\tentailment",
            "1\tWho?\tNobody knows where.\tnot_entailment"]
    _write(tmp_path, "QNLI", "train", rows)
    d = read_split("qnli", tmp_path, "train")
    assert d.labels == [0, 1]
    assert d.text_a == ["What came into force?", "Who?"]
    assert d.text_b == ["The law came into force.", "Nobody knows where."]


def test_wnli(tmp_path):
    rows = ["index\tsentence1\tsentence2\tlabel", "0\tI stuck a pin.\tI stuck a pin through a carrot.\t1",
            "1\tJohn could not lift.\tHis son could not lift.\t0"]
    _write(tmp_path, "WNLI", "train", rows)
    d = read_split("wnli", tmp_path, "train")
    assert d.labels == [1, 0] and d.text_b == ["I stuck a pin through a carrot.", "His son could not lift."]


def test_qqp(tmp_path):
    rows = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            "133273\t213221\t213222\tHow is the life?\tHow is life?\t1",
            "402555\t536040\t536041\tWhy are you?\tWho am I?\t0"]
    _write(tmp_path, "QQP", "dev", rows)
    d = read_split("qqp", tmp_path, "dev")
    assert d.labels == [1, 0]
    assert d.text_a == ["How is the life?", "Why are you?"] and d.text_b == ["How is life?", "Who am I?"]


def test_mnli_train_matched_mismatched(tmp_path):
    _write(tmp_path, "MNLI", "train", [MNLI_HEAD + "\tlabel1\tgold_label",
                                        _mnli_row(0, "P0", "H0", "neutral", dev=False),
                                        _mnli_row(1, "P1", "H1", "entailment", dev=False)])
    dev_head = MNLI_HEAD + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
    _write(tmp_path, "MNLI", "dev_matched", [dev_head, _mnli_row(0, "M0", "MH0", "contradiction", dev=True)])
    _write(tmp_path, "MNLI", "dev_mismatched", [dev_head, _mnli_row(0, "X0", "XH0", "entailment", dev=True),
                                                 _mnli_row(1, "X1", "XH1", "neutral", dev=True)])
    tr = read_split("mnli", tmp_path, "train")
    assert (tr.text_a, tr.text_b, tr.labels) == (["P0", "P1"], ["H0", "H1"], [2, 1])
    m = read_split("mnli", tmp_path, "dev_matched")
    assert (m.text_a, m.text_b, m.labels) == (["M0"], ["MH0"], [0])
    assert read_split("mnli", tmp_path, "dev").text_a == ["M0"]  # "dev" = the selection split (matched)
    mm = read_split("MNLI-MM", tmp_path, "dev_mismatched")
    assert (mm.text_a, mm.text_b, mm.labels) == (["X0", "X1"], ["XH0", "XH1"], [1, 2])
    # A 12-column train row in a dev file is caught (dev has 16 columns).
    _write(tmp_path, "MNLI", "dev_matched", [dev_head, _mnli_row(0, "M0", "MH0", "neutral", dev=False)])
    with pytest.raises(MalformedDataError, match="12 column"):
        read_split("mnli", tmp_path, "dev_matched")


def test_crlf_lines_and_exotic_line_breaks_inside_text(tmp_path):
    path = tmp_path / "SST-2" / "dev.tsv"
    path.parent.mkdir()
    # \x0b and \u2028 would be line breaks for str.splitlines(); GLUE rows only end at "\n".
    path.write_bytes("sentence\tlabel\r\nfoo\x0bbar\t1\r\nbaz\u2028qux\t0\r\n".encode())
    d = read_split("sst2", tmp_path, "dev")
    assert d.text_a == ["foo\x0bbar", "baz\u2028qux"] and d.labels == [1, 0]


# --- Malformed rows ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, dir_name, lines, bad_line, expect",
    [
        ("sst2", "SST-2", ["sentence\tlabel", "good\t1", "no label column", "ok\t0"], 3, "1 column"),
        ("sst2", "SST-2", ["sentence\tlabel", "good\t1", "extra\ttab\t0"], 3, "3 column"),
        ("sst2", "SST-2", ["sentence\tlabel", "good\t1", "bad label\t2"], 3, "'2'"),
        ("cola", "CoLA", ["gj04\t1\t\tfine", "gj04\tyes\t\tbad"], 2, "'yes'"),
        ("rte", "RTE", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentails"], 2, "'entails'"),
        ("stsb", "STS-B", ["h\t" * 9 + "score", "0\tg\tf\ty\t1\tn\tn\ta\tb\t5.5"], 2, "[0, 5]"),
        ("stsb", "STS-B", ["h\t" * 9 + "score", "0\tg\tf\ty\t1\tn\tn\ta\tb\t-0.1"], 2, "'-0.1'"),
        ("stsb", "STS-B", ["h\t" * 9 + "score", "0\tg\tf\ty\t1\tn\tn\ta\tb\tfive"], 2, "'five'"),
        ("stsb", "STS-B", ["h\t" * 9 + "score", "0\tg\tf\ty\t1\tn\tn\ta\tb\tnan"], 2, "'nan'"),
        ("qqp", "QQP", ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "1\t2\t3\tonly one q\t0"], 2,
         "5 column"),
    ],
)
def test_malformed_row_raises_with_path_line_and_hint(tmp_path, task, dir_name, lines, bad_line, expect):
    path = _write(tmp_path, dir_name, "train", lines)
    with pytest.raises(MalformedDataError) as ei:
        read_split(task, tmp_path, "train")
    msg = str(ei.value)
    assert f"{path}:{bad_line}:" in msg
    assert expect in msg
    assert "data.skip_malformed: true" in msg


def test_skip_malformed_counts_and_describes(tmp_path):
    lines = ["sentence\tlabel", "good one\t1", "no tab here", "bad label\t7", "", "also good\t0",
             "three\tcols\t1"]
    _write(tmp_path, "SST-2", "train", lines)
    d = read_split("sst2", tmp_path, "train", skip_malformed=True)
    assert d.text_a == ["good one", "also good"] and d.labels == [1, 0]
    assert d.n_skipped == 4 == len(d.skipped)
    assert [s.split(":")[0] for s in d.skipped] == ["line 3", "line 4", "line 5", "line 7"]


def test_long_row_is_truncated_in_message(tmp_path):
    _write(tmp_path, "SST-2", "train", ["sentence\tlabel", "x" * 5000])
    with pytest.raises(MalformedDataError) as ei:
        read_split("sst2", tmp_path, "train")
    assert "..." in str(ei.value) and len(str(ei.value)) < 1000


def test_bad_header_always_raises(tmp_path):
    # A CoLA-style headerless file given as SST-2 train: wrong header is the wrong file, not a stray row.
    _write(tmp_path, "SST-2", "train", ["gj04\t1\t\tThe sailors rode.", "gj04\t1\t\tOther."])
    with pytest.raises(MalformedDataError, match=r"train\.tsv:1: header"):
        read_split("sst2", tmp_path, "train", skip_malformed=True)


def test_missing_file_and_missing_dir(tmp_path):
    with pytest.raises(GlueFileNotFoundError) as ei:
        read_split("cola", tmp_path, "dev")
    msg = str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)
    assert str(tmp_path / "CoLA" / "dev.tsv") in msg and "no header" in msg and "GLUE download layout" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_split("sst2", tmp_path / "nope", "train")


def test_unknown_split_rejected(tmp_path):
    with pytest.raises(ValueError, match="dev_matched"):
        read_split("mnli", tmp_path, "dev_mismatch")
    with pytest.raises(ValueError, match="test"):
        read_split("sst2", tmp_path, "test")


# --- Directory resolution and hub fallback ------------------------------------------------------


def test_find_glue_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "env"))
    assert find_glue_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert find_glue_dir(None) == tmp_path / "env"
    assert find_glue_dir("") == tmp_path / "env"
    monkeypatch.delenv("GLUE_DIR")
    assert find_glue_dir(None) is None


def test_load_from_hub_failure_points_to_glue_dir(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HubUnavailableError) as ei:
        load_from_hub("sst2", "dev")
    msg = str(ei.value)
    assert "GLUE_DIR" in msg and "data.glue_dir" in msg and "SST-2" in msg and "validation" in msg


def test_load_from_hub_remaps_mnli_labels_by_name(monkeypatch):
    import datasets

    calls = []
    hub_names = ["entailment", "neutral", "contradiction"]  # nyu-mll/glue's ClassLabel order for mnli

    def fake(path, name, split):
        calls.append((path, name, split))
        string = datasets.Value("string")
        feats = datasets.Features(
            {"premise": string, "hypothesis": string, "label": datasets.ClassLabel(names=hub_names)}
        )
        data = {"premise": [" p0", "p1", "p2"], "hypothesis": ["h0", "h1", "h2"], "label": [0, 1, 2]}
        return datasets.Dataset.from_dict(data, features=feats)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    d = load_from_hub("mnli-mm", "dev_mismatched")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    ours = TASKS["mnli"].labels
    assert [ours[i] for i in d.labels] == hub_names
    assert d.text_a == ["p0", "p1", "p2"] and d.text_b == ["h0", "h1", "h2"]


def test_load_split_prefers_local_dir(monkeypatch, tmp_path):
    _write(tmp_path, "SST-2", "dev", ["sentence\tlabel", "x\t1"])
    monkeypatch.setattr(glue, "load_from_hub", lambda *a, **k: pytest.fail("hub must not be used"))
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    assert load_split("sst2", "dev").labels == [1]


# --- The real shared GLUE files (counts from /work/shared/data/glue/README.md) -------------------

_GLUE_DIR = os.environ.get("GLUE_DIR", "")
needs_glue = pytest.mark.skipif(
    not _GLUE_DIR or not Path(_GLUE_DIR, "SST-2").is_dir(), reason="GLUE_DIR not set or has no SST-2"
)


@needs_glue
@pytest.mark.parametrize(
    "task, split, n_rows, counts",
    [
        ("sst2", "train", 67349, {0: 29780, 1: 37569}),
        ("sst2", "dev", 872, {0: 428, 1: 444}),
        ("cola", "train", 8551, {0: 2528, 1: 6023}),
        ("cola", "dev", 1043, {0: 322, 1: 721}),
        ("stsb", "train", 5749, None),
        ("stsb", "dev", 1500, None),
    ],
)
def test_real_glue_files(task, split, n_rows, counts):
    d = read_split(task, _GLUE_DIR, split)
    assert len(d.text_a) == len(d) == n_rows and d.n_skipped == 0
    if counts is not None:
        assert {k: d.labels.count(k) for k in set(d.labels)} == counts
        assert d.text_b is None
    else:
        assert len(d.text_b) == n_rows and all(0.0 <= s <= 5.0 for s in d.labels)
    assert all(d.text_a)


@needs_glue
def test_real_first_rows():
    sst = read_split("sst2", _GLUE_DIR, "train")
    assert (sst.text_a[0], sst.labels[0]) == ("hide new secretions from the parental units", 0)
    cola = read_split("cola", _GLUE_DIR, "dev")
    assert (cola.text_a[0], cola.labels[0]) == ("The sailors rode the breeze clear of the rocks.", 1)
    sts = read_split("stsb", _GLUE_DIR, "dev")
    assert sts.text_a[0] == "A man with a hard hat is dancing." and sts.labels[:2] == [5.0, 4.75]


@pytest.mark.parametrize("bom", [False, True])
def test_missing_header_detected(tmp_path, bom):
    # SST-2 without its "sentence\tlabel" header: the first example must not be eaten as a header.
    _write(tmp_path, "SST-2", "dev", ["hide new secretions \t0", "contains no wit \t0"])
    with pytest.raises(MalformedDataError, match=r"dev\.tsv:1: first line .* looks like a data row"):
        read_split("sst2", tmp_path, "dev")
    # Same for MRPC (label in column 1) with a BOM: "\ufeff1" must be read as label "1", not as a header.
    _write(tmp_path, "MRPC", "dev", ["1\t1\t2\ta\tb", "0\t3\t4\tc\td"], bom=bom)
    with pytest.raises(MalformedDataError, match="looks like a data row"):
        read_split("mrpc", tmp_path, "dev")


def test_empty_files_raise(tmp_path):
    _write(tmp_path, "CoLA", "train", [], trailing_newline=False)
    with pytest.raises(MalformedDataError, match="no usable data rows"):
        read_split("cola", tmp_path, "train")
    _write(tmp_path, "SST-2", "train", ["sentence\tlabel"])
    with pytest.raises(MalformedDataError, match="no usable data rows"):
        read_split("sst2", tmp_path, "train")
    _write(tmp_path, "SST-2", "dev", ["sentence\tlabel", "bad\t9"])
    with pytest.raises(MalformedDataError, match=r"1 malformed skipped"):
        read_split("sst2", tmp_path, "dev", skip_malformed=True)
