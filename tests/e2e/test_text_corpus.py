"""One plain-text corpus file, as practitioners bring it, through the real launcher: it trains and
evaluates with each ``data.sample_by`` (by document, the eval set is a share of its windows)."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import QUICK, launch, read_metrics


def _corpus(path) -> str:
    """A single .txt file of the synthetic task's lines, in blank-line separated paragraphs of four."""
    from falqon_dist.data.synthetic import finetune_splits

    records, _ = finetune_splits("shift", 160, 8, seed=7)
    lines = [r["prompt"] + r["response"] for r in records]
    paragraphs = ["\n".join(lines[i : i + 4]) for i in range(0, len(lines), 4)]
    path.write_text("\n\n".join(paragraphs) + "\n")
    return str(path)


@pytest.mark.parametrize("sample_by", ["document", "paragraph", "line"])
def test_one_text_file_trains_with_each_sample_by(sample_by, tmp_path):
    run_dir = tmp_path / "run"
    corpus = _corpus(tmp_path / "corpus.txt")
    launch(
        "torchrun",
        [
            *QUICK[:3],
            "train.eval_samples=8",
            "train.lr=0.01",
            "method=lora",
            f"run.dir={run_dir}",
            "data=text",
            f"data.path={corpus}",
            f"data.sample_by={sample_by}",
            "data.eval_fraction=0.1",
        ],
        timeout=300,
    )
    evals = [m for m in read_metrics(run_dir) if "eval_loss" in m]
    assert len(evals) >= 2 and evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals
    saved = (run_dir / "config.yaml").read_text()
    assert f"sample_by: {sample_by}" in saved
