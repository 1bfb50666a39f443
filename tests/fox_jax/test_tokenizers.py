"""The one tokenizer interface (fox_jax.data.tokenizer): the byte tokenizer, a Hugging Face
tokenizer.json and a SentencePiece model, the latter two trained here offline on a few lines."""

import json
import os
import pickle
import random
import sys

import numpy as np
import pytest

from fox_jax.data import tokenizer as tok_lib
from fox_jax.errors import UsageError

WORDS = ("the quick brown fox jumps over the lazy dog while a forgetting transformer gates its "
         "attention with a learned decay; héllo wörld, ça va? naïve café über straße 東京 "
         "is a city").split()
ASCII = "the lazy fox gates attention"
NON_ASCII = "héllo wörld, ça va? naïve café 東京"


def corpus_lines():
  rng = random.Random(0)
  return [" ".join(rng.sample(WORDS, 8)) for _ in range(200)]


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
  """A byte-level BPE tokenizer.json with <pad>, <s>, </s>, a post-processor that adds <s>,
  and the tokenizer_config.json naming the three."""
  tokenizers = pytest.importorskip("tokenizers")
  folder = tmp_path_factory.mktemp("hf")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus_lines(), trainer)
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}))
  return str(folder / "tokenizer.json")


def train_sentencepiece(folder, **ids) -> str:
  spm = pytest.importorskip("sentencepiece")
  text = folder / "corpus.txt"
  text.write_text("\n".join(corpus_lines()), encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(folder / "sp"), vocab_size=80, hard_vocab_limit=False,
      character_coverage=1.0, minloglevel=2, **{"unk_id": 0, "bos_id": 1, "eos_id": 2,
                                                "pad_id": 3, **ids})
  return str(folder / "sp.model")


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
  return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(params=["bytes", "hf", "sp"])
def tok(request, hf_path, sp_path):
  return tok_lib.load_tokenizer({"bytes": "bytes", "hf": hf_path, "sp": sp_path}[request.param])


@pytest.mark.parametrize("text", [ASCII, NON_ASCII])
def test_round_trip(tok, text):
  ids = tok.encode(text, add_bos=False, add_eos=False)
  assert ids.dtype == np.int32 and ids.size and tok.decode(ids) == text
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode(tok.encode_document(text)) == text
  assert tok.decode(tok.encode_document(text.encode("utf-8"))) == text
  assert ids.max() < tok.vocab_size and not set(ids.tolist()) & set(tok.special_ids)


def test_documents_start_with_bos_and_end_with_eos(tok):
  doc = tok.encode_document(NON_ASCII)
  assert doc[0] == tok.bos_id == tok.BOS_ID and doc[-1] == tok.eos_id == tok.EOS_ID
  np.testing.assert_array_equal(doc[1:-1], tok.encode(NON_ASCII, add_bos=False, add_eos=False))
  np.testing.assert_array_equal(doc, tok.encode(NON_ASCII, add_bos=True, add_eos=True))


def test_decode_stops_at_eos_and_drops_special_and_foreign_ids(tok):
  ids = tok.encode(ASCII, add_bos=False, add_eos=False).tolist()
  noise = [tok.bos_id, tok.pad_id, tok.vocab_size + 5, -1]
  assert tok.decode(noise + ids + [tok.eos_id] + ids) == ASCII


def test_the_ids_are_the_tokenizers_own(hf_path, sp_path):
  import sentencepiece
  import tokenizers
  b = tok_lib.load_tokenizer("bytes")
  assert (b.name, b.vocab_size, b.pad_id, b.bos_id, b.eos_id) == ("bytes", 259, 256, 257, 258)
  assert b.special_ids == (256, 257, 258) and b.PAD_ID == 256
  assert (tok_lib.PAD_ID, tok_lib.BOS_ID, tok_lib.EOS_ID, tok_lib.NUM_TOKENS) == (256, 257, 258,
                                                                                   259)
  hf, file = tok_lib.load_tokenizer(hf_path), tokenizers.Tokenizer.from_file(hf_path)
  assert hf.name == hf_path and hf.vocab_size == file.get_vocab_size(with_added_tokens=True)
  assert (hf.pad_id, hf.bos_id, hf.eos_id) == (0, 1, 2) and hf.special_ids == (0, 1, 2)
  sp, model = tok_lib.load_tokenizer(sp_path), sentencepiece.SentencePieceProcessor(
      model_file=sp_path)
  assert sp.name == sp_path and sp.vocab_size == model.get_piece_size()
  assert (sp.pad_id, sp.bos_id, sp.eos_id) == (3, 1, 2) and sp.special_ids == (0, 1, 2, 3)


def test_encode_flags(hf_path, sp_path):
  b, hf, sp = (tok_lib.load_tokenizer(s) for s in ("bytes", hf_path, sp_path))
  assert b.encode("ab").tolist() == [257, 97, 98]  # a prompt: BOS first
  assert b.encode("ab", add_eos=True).tolist() == [257, 97, 98, 258]
  assert b.encode("ab", add_bos=False).tolist() == [97, 98]
  body = hf.encode("ab", add_bos=False, add_eos=False).tolist()
  assert hf.encode("ab").tolist() == [1] + body  # the file's post-processor
  assert hf.encode("ab", add_eos=True).tolist() == body + [2]
  body = sp.encode("ab", add_bos=False, add_eos=False).tolist()
  assert sp.encode("ab").tolist() == [1] + body


def test_a_missing_bos_or_eos_is_none_and_one_line_when_asked_for(tmp_path, sp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<|endoftext|>": 0, "a": 1, "b": 2}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
  tok.add_special_tokens(["<|endoftext|>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  # No tokenizer_config.json: the conventional name gives EOS (GPT-2's), nothing gives BOS.
  gpt2 = tok_lib.HFTokenizer(str(tmp_path / "tokenizer.json"))
  assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id) == (None, 0, None)
  assert gpt2.encode_document("ab").tolist() == [1, 2, 0]
  with pytest.raises(UsageError, match="no bos_token is known") as e:
    gpt2.encode("ab", add_bos=True)
  assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
  # A tokenizer_config.json beside it decides, even when it names none.
  (tmp_path / "tokenizer_config.json").write_text("{}")
  assert tok_lib.HFTokenizer(str(tmp_path / "tokenizer.json")).eos_id is None
  no_bos = tok_lib.SentencePieceTokenizer(train_sentencepiece(tmp_path, bos_id=-1))
  body = no_bos.encode("ab", add_bos=False).tolist()
  assert no_bos.bos_id is None and no_bos.encode("ab").tolist() == body
  assert no_bos.encode_document("ab").tolist() == body + [no_bos.eos_id]
  assert no_bos.encode("ab", add_eos=True).tolist() == body + [no_bos.eos_id]
  with pytest.raises(UsageError, match="has no bos token"):
    no_bos.encode("ab", add_bos=True)


def test_byte_documents_are_the_old_encode_bit_for_bit():
  b = tok_lib.BytesTokenizer()
  for text in ["", "def f(x):\n  return 'ü' * x\n", bytes(range(256)), "東京\x00"]:
    data = text.encode("utf-8") if isinstance(text, str) else text
    # fox_jax.data.tokenizer.encode before the interface, written out.
    old = np.concatenate([np.array([257], np.uint16),
                          np.frombuffer(data, dtype=np.uint8).astype(np.uint16),
                          np.array([258], np.uint16)])
    for got in (b.encode_document(text), tok_lib.encode(text)):
      assert got.dtype == np.uint16 and got.tobytes() == old.tobytes()
  assert tok_lib.decode(tok_lib.encode("ü")) == "ü"


def test_padded_vocab_size():
  assert tok_lib.padded_vocab_size(259) == 384
  assert tok_lib.padded_vocab_size(tok_lib.BytesTokenizer().vocab_size) == 384
  assert tok_lib.padded_vocab_size(50257) == 50304
  assert tok_lib.padded_vocab_size(128) == 128 and tok_lib.padded_vocab_size(1) == 128
  assert tok_lib.padded_vocab_size(100, multiple=64) == 128
  for bad in ({"n": 0}, {"n": 5, "multiple": 0}, {"n": 2.5}):
    with pytest.raises(ValueError, match=list(bad)[-1]):
      tok_lib.padded_vocab_size(**{"n": 1, **bad})


def test_load_tokenizer_dispatch(hf_path, sp_path, tmp_path, monkeypatch):
  assert type(tok_lib.load_tokenizer("bytes")) is tok_lib.BytesTokenizer
  assert type(tok_lib.load_tokenizer(hf_path)) is tok_lib.HFTokenizer
  assert type(tok_lib.load_tokenizer(sp_path)) is tok_lib.SentencePieceTokenizer
  in_dir = tok_lib.load_tokenizer(os.path.dirname(hf_path))
  assert type(in_dir) is tok_lib.HFTokenizer and in_dir.name == hf_path
  assert tok_lib.load_tokenizer(sp_path) is tok_lib.load_tokenizer(sp_path)  # cached
  assert set(tok_lib.TOKENIZERS) == {"bytes", "hf", "sentencepiece"}
  # The cache is by path from here: a relative spec read elsewhere is that directory's file.
  monkeypatch.chdir(os.path.dirname(sp_path))
  assert tok_lib.load_tokenizer("sp.model").vocab_size == tok_lib.load_tokenizer(
      sp_path).vocab_size
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UsageError, match="no such file: sp.model"):
    tok_lib.load_tokenizer("sp.model")


def one_line_error(spec) -> str:
  with pytest.raises(UsageError) as e:
    tok_lib.load_tokenizer(spec)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_load_tokenizer_errors_are_one_line(tmp_path):
  forms = "expected 'bytes', a Hugging Face .json file (or a directory holding tokenizer.json)"
  assert one_line_error("gpt2") == f"tokenizer 'gpt2': {forms} or a SentencePiece .model file"
  assert forms in one_line_error(str(tmp_path))  # a directory without tokenizer.json
  assert forms in one_line_error("")
  missing = str(tmp_path / "nope" / "tokenizer.json")
  assert one_line_error(missing) == f"no such file: {missing}"
  assert one_line_error(str(tmp_path / "x.model")) == f"no such file: {tmp_path / 'x.model'}"
  (tmp_path / "a.json").write_text('{"not": "a tokenizer"}')
  pytest.importorskip("tokenizers")
  message = one_line_error(str(tmp_path / "a.json"))
  assert message.startswith(f"{tmp_path / 'a.json'} is not a tokenizer the 'tokenizers' "
                            f"package can read (")
  (tmp_path / "b.model").write_bytes(b"\x00garbage\xff" * 10)
  pytest.importorskip("sentencepiece")
  assert one_line_error(str(tmp_path / "b.model")).startswith(
      f"{tmp_path / 'b.model'} is not a model the 'sentencepiece' package can read (")
  (tmp_path / "dir.model").mkdir()
  assert forms in one_line_error(str(tmp_path / "dir.model"))


@pytest.mark.parametrize("package", ["tokenizers", "sentencepiece"])
def test_a_missing_package_names_what_to_install(package, tmp_path, monkeypatch):
  path = tmp_path / ("t.json" if package == "tokenizers" else "t.model")
  path.write_text("{}")
  monkeypatch.setitem(sys.modules, package, None)  # import fails
  assert one_line_error(str(path)) == (f"{path} needs the '{package}' package, which is not "
                                       f"installed (pip install {package})")


def test_tokenizers_pickle(tok, tmp_path):
  copy = pickle.loads(pickle.dumps(tok))
  assert type(copy) is type(tok) and copy.name == tok.name
  for attr in ("vocab_size", "bos_id", "eos_id", "pad_id", "special_ids"):
    assert getattr(copy, attr) == getattr(tok, attr)
  np.testing.assert_array_equal(copy.encode_document(NON_ASCII), tok.encode_document(NON_ASCII))
  assert copy.decode(copy.encode(NON_ASCII)) == NON_ASCII


def test_loading_keeps_its_names(hf_path):
  from fox_jax import loading
  assert loading.ByteTokenizer is tok_lib.BytesTokenizer
  assert loading.HFTokenizer is tok_lib.HFTokenizer and loading.Tokenizer is tok_lib.Tokenizer
  assert isinstance(loading.HFTokenizer(hf_path), loading.Tokenizer)
