"""Mail Classes in greenarrow.conf, their cache, and SendID construction (greenarrow.lib.simplemh.mail_class).

Also the promise to command-line injection: with no class applying, the
`sendmail` fast path imports neither the greenarrow.conf parser nor `re`,
`json`, `pathlib`, `email`, `hmac`/`hashlib` nor the SimpleMH extension.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from greenarrow.lib.config import conf
from greenarrow.lib.core.paths import Root
from greenarrow.lib.ops.install_root import init_root
from greenarrow.lib.simplemh import mail_class

CLASSES = """\
general {
    default_mail_class News
    process_x_job_header yes
    default_event_tracking_metadata_storage stateless
}
mail_class News {
    listid t100
    virtual_mta pool1
    track_clicks_and_opens yes
    track_text_links no
    url_domain links.example.com/t/
    bounce_address bounce@bounces.example.com
    list_unsubscribe no
    handle_bounce_and_fbl no
    statistic_report_grouping per_instanceid_legacy
}
mail_class transactional {
    url_domain http://t.example.com
}
"""


@pytest.fixture
def root(tmp_path: Path) -> Root:
    r = Root(tmp_path / "hvmail")
    init_root(r, "mc.test")
    mail_class._memo.clear()
    return r


def write_conf(root: Root, text: str) -> None:
    path = root.control / "greenarrow.conf"
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    # a different mtime even on coarse clocks: the cache is keyed by it
    os.utime(path, ns=(old + 2_000_000_000, old + 2_000_000_000))


def test_compile_every_directive(root: Root) -> None:
    write_conf(root, CLASSES)
    classes = mail_class.load(str(root.path))
    assert classes.default == "News"
    assert classes.process_x_job_header and not classes.process_x_virtual_mta_header
    assert classes.default_event_tracking_metadata_storage == "stateless"
    news = classes.get("news")
    assert news is classes.get("NEWS") and news.name == "News"
    assert (news.listid, news.virtual_mta, news.track_clicks_and_opens, news.track_text_links,
            news.url_domain, news.bounce_address, news.list_unsubscribe,
            news.handle_bounce_and_fbl, news.statistic_report_grouping) == (
        "t100", "pool1", True, False, "https://links.example.com/t",
        "bounce@bounces.example.com", False, False, "per_instanceid_legacy")
    t = classes.get("transactional")
    assert (t.url_domain, t.track_clicks_and_opens, t.list_unsubscribe, t.handle_bounce_and_fbl,
            t.statistic_report_grouping, t.track_text_links) == (
        "http://t.example.com", False, True, True, mail_class.DEFAULT_GROUPING, True)


def test_no_file_or_no_classes_is_empty(root: Root) -> None:
    (root.control / "greenarrow.conf").unlink()
    assert mail_class.load(str(root.path)).classes == {}
    write_conf(root, "general {\n    system_max_smtp_connections 10\n}\n")
    assert mail_class.load(str(root.path)) == mail_class.EMPTY


@pytest.mark.parametrize(("text", "line", "message"), [
    ("mail_class 1bad {\n}\n", 1, "invalid Mail Class"),
    ("mail_class a {\n listid bad-id\n}\n", 2, "invalid ListID"),
    ("mail_class a {\n virtual_mta a@b\n}\n", 2, "invalid MtaID"),
    ("mail_class a {\n url_domain ftp://x\n}\n", 2, "invalid url_domain"),
    ("mail_class a {\n url_domain \"https://x/?q\"\n}\n", 2, "invalid url_domain"),
    ("mail_class a {\n bounce_address nobody\n}\n", 2, "bounce_address"),
    ("mail_class a {\n statistic_report_grouping daily\n}\n", 2, "statistic_report_grouping"),
    ("mail_class a {\n track_clicks_and_opens yes\n}\n", 1, "needs a url_domain"),
    ("mail_class a {\n track_clicks_and_opens maybe\n}\n", 2, "yes or no"),
    ("general {\n default_mail_class b\n}\nmail_class a {\n}\n", 2, "no mail_class"),
    ("general {\n default_event_tracking_metadata_storage cloud\n}\n", 2, "local or stateless"),
])
def test_errors_name_file_and_line(root: Root, text: str, line: int, message: str) -> None:
    write_conf(root, text)
    with pytest.raises(mail_class.MailClassConfigError) as e:
        mail_class.load(str(root.path))
    assert f"greenarrow.conf:{line}:" in str(e.value)
    assert message in str(e.value)


def test_cache_written_reused_and_invalidated(root: Root, monkeypatch: pytest.MonkeyPatch) -> None:
    write_conf(root, CLASSES)
    first = mail_class.load(str(root.path))
    cache = root.var / mail_class.CACHE_NAME
    assert cache.exists()
    # a new process (no memo) reads the cache without the parser
    mail_class._memo.clear()
    monkeypatch.setattr(conf, "load", lambda *a, **k: pytest.fail("parsed despite the cache"))
    assert mail_class.load(str(root.path)) == first
    monkeypatch.undo()
    # an edit (new mtime and size) is seen at once
    write_conf(root, CLASSES.replace("listid t100", "listid t200"))
    assert mail_class.load(str(root.path)).get("news").listid == "t200"


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-stat", "os-stat"])
def test_edit_seen_with_either_stat(root: Root, monkeypatch: pytest.MonkeyPatch,
                                    compiled: bool) -> None:
    """Once SimpleMH has loaded its extension, load() stats greenarrow.conf through it; the
    key is the same, and an edit is seen by the next call either way."""
    from greenarrow.pyx import simplemh as fast

    file_key = fast.file_key if compiled else None
    write_conf(root, CLASSES)
    first = mail_class.load(str(root.path), file_key)
    assert mail_class.load(str(root.path), file_key) is first  # unchanged: the memo
    write_conf(root, CLASSES.replace("listid t100", "listid t2"))
    assert mail_class.load(str(root.path), file_key).get("news").listid == "t2"
    conf_path = root.control / "greenarrow.conf"
    st = os.stat(conf_path)
    assert fast.file_key(os.fsencode(conf_path)) == mail_class._stat_key(st)
    conf_path.unlink()
    assert mail_class.load(str(root.path)) is mail_class.EMPTY


@pytest.mark.parametrize("now", [0, 86399.9, 86400, -0.5, 1.7e9, 1.7e9 + 86400 * 3.3, 4e9])
def test_utc_day_is_strftime(now: float) -> None:
    for _ in range(2):  # computed, then remembered
        assert mail_class._utc_day(now) == time.strftime("%Y%m%d", time.gmtime(now))


def test_broken_file_keeps_the_last_good_cache(root: Root) -> None:
    write_conf(root, CLASSES)
    good = mail_class.load(str(root.path))
    write_conf(root, CLASSES + "mail_class {\n")
    assert mail_class.load(str(root.path)) == good
    (root.var / mail_class.CACHE_NAME).unlink()
    with pytest.raises(mail_class.MailClassConfigError):
        mail_class.load(str(root.path))


def test_unwritable_cache_still_works(root: Root) -> None:
    """When the cache cannot be written (here a folder sits in its place, which stops root
    too), classes are compiled each time: slower, still right."""
    write_conf(root, CLASSES)
    (root.var / mail_class.CACHE_NAME).mkdir()
    assert mail_class.load(str(root.path)).get("news").listid == "t100"
    mail_class._memo.clear()
    assert mail_class.load(str(root.path)).get("news").listid == "t100"
    assert list(root.var.glob("*.tmp")) == []


def test_cache_round_trip_with_odd_values() -> None:
    classes = mail_class.MailClasses()
    mc = classes.classes["x"] = mail_class.MailClass("X")
    mc.url_domain = "https://h/a\tb\\n"
    mc.track_clicks_and_opens = True
    classes.default = "X"
    assert mail_class.loads_cache(mail_class.dumps_cache(classes)) == classes


def test_conf_check_accepts_the_directives() -> None:
    conf.parse(CLASSES)  # the SCHEMA rows exist


@pytest.mark.parametrize(("grouping", "instance", "expected"), [
    ("per_instanceid_legacy", "0901220005", "news0901220005"),
    ("per_instanceid_legacy", "", "news20260105"),
    ("per_mailclass_and_instanceid", "Spring2026", "news-spring2026"),
    ("per_mailclass_and_instanceid", "", "news-20260105"),
    ("per_mailclass_per_day", "anything", "news-20260105"),
    ("per_mailclass_per_month", "anything", "news-202601"),
])
def test_build_sendid(grouping: str, instance: str, expected: str) -> None:
    now = time.mktime((2026, 1, 5, 12, 0, 0, 0, 0, 0)) - time.timezone
    assert mail_class.build_sendid("News", instance, grouping, now) == expected


def test_sendid_case_insensitive_and_hashed_when_unfit() -> None:
    g = "per_mailclass_and_instanceid"
    assert (mail_class.build_sendid("n", "Sale A", g, 0)
            == mail_class.build_sendid("n", "sale a", g, 0))
    sid = mail_class.build_sendid("n", "Sale A", g, 0)
    assert sid.startswith("n-h") and len(sid) == 2 + 1 + 16 and " " not in sid
    assert len(mail_class.build_sendid("n", "x" * 300, g, 0)) <= 100
    with pytest.raises(ValueError):
        mail_class.build_sendid("n", "1", "weekly", 0)


@pytest.mark.parametrize(("value", "grouping", "ok"), [
    ("0901220005", "per_instanceid_legacy", True),
    ("1" + "a" * 26, "per_instanceid_legacy", True),
    ("1" + "a" * 27, "per_instanceid_legacy", False),
    ("a123", "per_instanceid_legacy", False),
    ("1-2", "per_instanceid_legacy", False),
    ("Spring sale! (2026)", "per_mailclass_and_instanceid", True),
    ("~" * 300, "per_mailclass_per_day", True),
    ("~" * 301, "per_mailclass_per_day", False),
    ("tab\there", "per_mailclass_and_instanceid", False),
    ("caf\u00e9", "per_mailclass_and_instanceid", False),
])
def test_instanceid_rules(value: str, grouping: str, ok: bool) -> None:
    assert (mail_class.instanceid_problem(value, grouping) is None) == ok


@pytest.mark.parametrize(("text", "expected"), [
    ("https://links.example.com", "https://links.example.com"),
    ("HTTP://links.example.com/", "http://links.example.com"),
    ("links.example.com", "https://links.example.com"),
    ("https://links.example.com:8443/t/", "https://links.example.com:8443/t"),
    ("ftp://x", None), ("https://", None), ("https://a b", None), ("https://x/?q=1", None),
    ('https://x/"', None), ("https://u@x", None),
])
def test_normalize_url_domain(text: str, expected: str | None) -> None:
    assert mail_class.normalize_url_domain(text) == expected


FORBIDDEN = ("greenarrow.lib.config.conf", "re", "json", "pathlib", "email", "hmac", "hashlib",
             "greenarrow.pyx.simplemh", "greenarrow.lib.simplemh.processing")


def _imports(root: Root, message: bytes, env: dict[str, str] | None = None) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", str(root.bin / "sendmail.py"), "-f",
         "s@example.com", "r@example.com"],
        input=message, capture_output=True, timeout=60,
        env={"PATH": os.environ.get("PATH", ""), **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    names = set()
    for line in proc.stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


@pytest.mark.parametrize("conf_text", ["", "mail_class other {\n    listid x\n}\n"])
def test_fast_path_stays_light(root: Root, conf_text: str) -> None:
    """Raw injection (no class selected) through bin/sendmail imports nothing heavy,
    once the cache exists, whether or not greenarrow.conf defines classes."""
    write_conf(root, conf_text)
    message = b"Subject: raw\n\nbody\n"
    _imports(root, message)  # the first run after an edit compiles the cache
    names = _imports(root, message)
    heavy = sorted(n for n in names if n in FORBIDDEN or n.startswith("email."))
    assert heavy == []
    # a SimpleMH message does load them
    write_conf(root, "mail_class news {\n    listid t1\n}\n")
    names = _imports(root, message, {"GREENARROW_MAILCLASS": "news"})
    assert "greenarrow.lib.simplemh.processing" in names


def test_error_elsewhere_does_not_stop_mail_classes(root: Root) -> None:
    """With no cache yet, a mistake outside the mail classes leaves them usable."""
    write_conf(root, CLASSES.replace("process_x_job_header yes",
                                     "process_x_job_header yes\n    system_max_smtp_connections x")
               + "ip_address * {\n  domain d.test {\n    smtp_route 127.0.0.1:99999\n  }\n}\n")
    classes = mail_class.load(str(root.path))
    assert classes.default == "News" and classes.process_x_job_header
    assert classes.get("news").listid == "t100"
    # a mistake in the mail classes themselves is an error (once no good cache is left)
    (root.var / mail_class.CACHE_NAME).unlink()
    write_conf(root, "mail_class a {\n    bogus 1\n}\n")
    with pytest.raises(mail_class.MailClassConfigError, match="greenarrow.conf:2: unknown directive"):
        mail_class.load(str(root.path))
    write_conf(root, "mail_class a {\n")
    with pytest.raises(mail_class.MailClassConfigError, match="never closed"):
        mail_class.load(str(root.path))
