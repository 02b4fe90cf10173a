"""The covariance statistics are keyed by the text they were measured on."""

from editing import stats
from editing.models import wrap_model
from tests.helpers import tiny_model, tiny_tokenizer


def test_text_source_is_in_the_statistics_cache_key(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLABEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("COLLABEDIT_DATA", raising=False)
    lm = wrap_model(tiny_model("gpt2"), tiny_tokenizer("gpt2"), "tiny-gpt2")
    leads = tmp_path / "data" / stats.WIKI_LEADS
    hub = stats.text_source(tmp_path / "data")
    assert hub.startswith("hub-")
    leads.parent.mkdir(parents=True)
    leads.write_text("First lead.\n\nSecond lead.\n")
    local = stats.text_source(tmp_path / "data")
    assert local.startswith("leads-") and local != hub
    assert stats.wiki_texts(2, tmp_path / "data") == ["First lead.", "Second lead."]
    paths = {s: stats._cache_path(lm, 1, 1000, 256, s) for s in (hub, local)}
    assert paths[hub] != paths[local] and local in paths[local].name
