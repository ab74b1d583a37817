"""An exported candidate as an MLflow model: it appears under the run's Models, can be registered, and
``mlflow.pyfunc.load_model(uri).predict(frame)`` scores a table of texts.

The model wraps the exported Hugging Face directory (remote code included) in a ``text-classification``
pipeline. Input: a DataFrame with a ``text`` column (and ``text_pair`` for sentence-pair tasks); output:
``label`` and ``score`` per row. Loading needs dynaflow installed (this class), as the card says.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

EXAMPLE = "a charming and funny film"


class TextClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from transformers import pipeline

        self.pipe = pipeline("text-classification", model=context.artifacts["model"], trust_remote_code=True)

    # No type hints here: MLflow would read them as a (list-only) input schema; the input example sets it.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import pandas as pd

        if "text_pair" in model_input:
            pairs = zip(model_input["text"], model_input["text_pair"], strict=True)
            inputs: list[Any] = [{"text": a, "text_pair": b} for a, b in pairs]
        else:
            inputs = [str(t) for t in model_input["text"]]
        return pd.DataFrame(self.pipe(inputs))


def log_exported_model(tracker: Any, export_dir: Path, name: str, pair: bool = False) -> str | None:
    """Log ``export_dir`` (a Hugging Face export) into the tracker's run as MLflow model ``name``, with
    an input example and the signature inferred from it; returns the model's URI (None: no tracking)."""
    if getattr(tracker, "run_id", None) is None:
        return None
    import pandas as pd

    example = pd.DataFrame({"text": [EXAMPLE], **({"text_pair": [EXAMPLE]} if pair else {})})
    mlflow.set_tracking_uri(tracker.client.tracking_uri)
    quiet = logging.getLogger("mlflow.pyfunc")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes on CloudPickle and on type hints are for model authors
    try:
        with warnings.catch_warnings(), mlflow.start_run(run_id=tracker.run_id):  # log_model needs one
            warnings.simplefilter("ignore", UserWarning)
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=TextClassifier(),
                artifacts={"model": str(export_dir)},
                input_example=example,
                pip_requirements=["torch", "transformers", "pandas"],
            )
    finally:
        quiet.setLevel(level)
    return info.model_uri
