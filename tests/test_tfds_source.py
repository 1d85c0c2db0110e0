"""tfds sources, offline: a tiny dataset is built locally (array_record, no TensorFlow) and read
back through `tfds.data_source`, by `open_source` and by the training pipeline."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dimba_jax.config import default_config
from dimba_jax.data.pipeline import make_eval_batches, make_train_iterator
from dimba_jax.data.sources import open_source
from dimba_jax.data.tokenizers import get_tokenizer

TRAIN_DOCS = [f"train document {i}: the quick brown fox, naïve café {i * i}" for i in range(30)]
TEST_DOCS = ["test document one", "test document two — über"]


class DimbaTinyTextForTests(tfds.core.GeneratorBasedBuilder):
    """A two-split text dataset with a `body` feature (text) and an `idx` feature (int)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"body": tfds.features.Text(), "idx": np.int64})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(TRAIN_DOCS), "test": self._generate_examples(TEST_DOCS)}

    def _generate_examples(self, docs):
        for i, text in enumerate(docs):
            yield i, {"body": text, "idx": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    DimbaTinyTextForTests(data_dir=str(path), file_format="array_record").download_and_prepare()
    return str(path)


def test_written_and_read_without_tensorflow(data_dir):
    assert "tensorflow" not in sys.modules


def test_open_tfds_source_decodes_text(data_dir):
    name = DimbaTinyTextForTests.name
    src = open_source(f"tfds:{name}", split="all", text_field="body", tfds_data_dir=data_dir)
    assert len(src) == 30
    assert sorted(src) == sorted(TRAIN_DOCS) and all(isinstance(d, str) for d in src)
    test = open_source(f"tfds:{name}:test", split="all", text_field="body", tfds_data_dir=data_dir)
    assert sorted(test) == sorted(TEST_DOCS)
    same = open_source(f"tfds:{name}", split="all", text_field="body", tfds_split="test", tfds_data_dir=data_dir)
    assert list(same) == list(test)
    train = open_source(f"tfds:{name}", split="train", text_field="body", tfds_data_dir=data_dir)
    val = open_source(f"tfds:{name}", split="validation", text_field="body", tfds_data_dir=data_dir)
    assert len(train) == 28 and len(val) == 2 and set(train).isdisjoint(val)


def test_tfds_errors(data_dir):
    name = DimbaTinyTextForTests.name
    with pytest.raises(ValueError, match="no text field 'text'.*body"):
        open_source(f"tfds:{name}", split="all", text_field="text", tfds_data_dir=data_dir)
    with pytest.raises(ValueError, match="'idx' is int, not text"):
        open_source(f"tfds:{name}", split="all", text_field="idx", tfds_data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="tfds dataset 'no_such_dataset_xyz'"):
        open_source("tfds:no_such_dataset_xyz", split="all", tfds_data_dir=data_dir)
    with pytest.raises(ValueError, match="missing dataset name"):
        open_source("tfds:", split="all")


def test_pipeline_reads_tfds(data_dir):
    data = default_config().data
    data.source, data.text_field, data.tfds_data_dir = f"tfds:{DimbaTinyTextForTests.name}", "body", data_dir
    data.val_source = f"tfds:{DimbaTinyTextForTests.name}:test"
    data.seq_len = 32
    tok = get_tokenizer("byte")
    it = make_train_iterator(data, tok, global_batch_size=4, seed=0)
    batches = [next(it)["tokens"] for _ in range(10)]
    assert all(b.shape == (4, 32) and b.dtype == np.int32 for b in batches)
    stream = b"".join(d.encode() for d in TRAIN_DOCS)
    for row in np.concatenate(batches):
        for piece in bytes(np.where(row == tok.eos_id, 0, row).astype(np.uint8)).split(b"\0"):
            assert piece in stream  # every EOS-free stretch of a window is text of a train document
    val = make_eval_batches(data, tok, 1, 1, 16)[0]["tokens"][0]
    assert tok.decode(val).startswith("test document")
