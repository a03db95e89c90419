"""Service URLs in Dubbo's format (docs/cluster.md, "URL format"), the static registry and
``open_registry``: pure units, no ZooKeeper server, no child process.

Each test pins what a user sees: the URL text written (and so the znode's name), what a
URL read back holds, and the whole text of each refusal. test_registry.py has the first
URL tests; these cover what they left open (found by mutation testing, docs/testing.md).
"""

from __future__ import annotations

import importlib.metadata
import re
import time

import pytest
from helpers import free_address

from backchannel.cluster.loadbalance import MAX_WEIGHT
from backchannel.cluster.registries import open_registry
from backchannel.cluster.registry import RegistryError, StaticRegistry
from backchannel.cluster.service_url import DEFAULT_WEIGHT, ServiceURL, decode, encode, release

RAW = "which Dubbo's URL format cannot carry (values are written raw)"


def refused(text: str) -> str:
    """The whole message of the ValueError ``ServiceURL.parse(text)`` raises."""
    with pytest.raises(ValueError) as error:
        ServiceURL.parse(text)
    return str(error.value)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- what a URL is written as ---------------------------------------------------------


def test_the_urls_of_docs_cluster_md_are_written_exactly() -> None:
    """The provider and consumer znodes of docs/cluster.md's listing ("ZooKeeper layout"),
    with this backchannel's release where the page shows 0.1.0: every key built from
    the arguments, and no key for an argument not given (no group, no version)."""
    provider = ServiceURL.provider(
        "demo.CallbackService",
        "10.0.0.7",
        50051,
        application="ticker",
        methods=["addListener", "removeListener"],
        callbacks=1000,
        timestamp=1796290050051,
    )
    consumer = ServiceURL.consumer(
        "demo.CallbackService",
        "10.0.0.9",
        application="dashboard",
        methods=["addListener", "removeListener"],
        timestamp=1796290001234,
    )
    documented = {
        provider: "backchannel%3A%2F%2F10.0.0.7%3A50051%2Fdemo.CallbackService%3Fapplication"
        "%3Dticker%26callbacks%3D1000%26interface%3Ddemo.CallbackService%26methods%3D"
        "addListener%2CremoveListener%26release%3D0.1.0%26side%3Dprovider%26timestamp%3D"
        "1796290050051%26weight%3D100",
        consumer: "consumer%3A%2F%2F10.0.0.9%2Fdemo.CallbackService%3Fapplication%3D"
        "dashboard%26category%3Dconsumers%26interface%3Ddemo.CallbackService%26methods%3D"
        "addListener%2CremoveListener%26release%3D0.1.0%26side%3Dconsumer%26timestamp%3D"
        "1796290001234",
    }
    for url, znode in documented.items():
        expected = znode.replace("release%3D0.1.0", f"release%3D{encode(release())}")
        assert encode(url.to_string()) == expected
        assert ServiceURL.parse(decode(expected)) == url


def test_a_consumer_url_carries_every_argument_given() -> None:
    url = ServiceURL.consumer(
        "demo.Echo",
        "10.0.0.9",
        application="shop",
        group="cn",
        version="1.0.0",
        methods=["echo", "ping"],
        timestamp=5,
    )
    assert url.to_string() == (
        "consumer://10.0.0.9/demo.Echo?application=shop&category=consumers&group=cn"
        f"&interface=demo.Echo&methods=echo,ping&release={release()}&side=consumer"
        "&timestamp=5&version=1.0.0"
    )


def test_urls_with_only_what_is_required() -> None:
    """No application, group, version or methods: no such key (Dubbo leaves empty keys
    out); a provider has Dubbo's default weight."""
    provider = ServiceURL.provider("demo.Echo", "h", 1, timestamp=7)
    assert provider.to_string() == (
        f"backchannel://h:1/demo.Echo?interface=demo.Echo&release={release()}"
        "&side=provider&timestamp=7&weight=100"
    )
    assert (provider.application, provider.group, provider.version) == ("", "", "")
    consumer = ServiceURL.consumer("demo.Echo", "h", timestamp=7)
    assert consumer.to_string() == (
        f"consumer://h/demo.Echo?category=consumers&interface=demo.Echo&release={release()}"
        "&side=consumer&timestamp=7"
    )
    assert (consumer.application, consumer.group, consumer.version) == ("", "", "")


def test_a_url_made_without_a_timestamp_is_stamped_now_in_whole_milliseconds() -> None:
    for make in (
        lambda: ServiceURL.provider("demo.Echo", "h", 1),
        lambda: ServiceURL.consumer("demo.Echo", "h"),
    ):
        before = now_ms()
        url = make()
        after = now_ms()
        assert type(url.timestamp) is int
        assert before <= url.timestamp <= after
        assert f"&timestamp={url.timestamp}" in url.to_string()
        assert ServiceURL.parse(url.to_string()) == url


def test_release_is_the_installed_backchannel_or_0_unknown_from_a_source_tree(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert release() == importlib.metadata.version("backchannel") != "0+unknown"

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert release() == "0+unknown"
    assert "&release=0+unknown&" in ServiceURL.provider("demo.Echo", "h", 1).to_string()


def test_a_provider_port_and_weight_at_their_bounds_are_accepted() -> None:
    url = ServiceURL.provider("demo.Echo", "h", 65535, weight=MAX_WEIGHT, timestamp=1)
    assert url.address == "h:65535" and url.weight == MAX_WEIGHT
    assert ServiceURL.parse(url.to_string()) == url
    drained = ServiceURL.provider("demo.Echo", "h", 1, weight=0, timestamp=1)
    assert "&weight=0" in drained.to_string()
    assert ServiceURL.parse(drained.to_string()).weight == 0
    with pytest.raises(ValueError) as error:
        ServiceURL.provider("demo.Echo", "h", 1, weight="100")  # type: ignore[arg-type]
    assert str(error.value) == f"a provider's weight must be an int in 0..{MAX_WEIGHT}, not '100'"


def test_values_a_url_cannot_carry_are_refused_with_the_whole_message() -> None:
    with pytest.raises(ValueError) as error:
        ServiceURL.provider("demo.Echo", "h", 1, group="a&b c")
    assert str(error.value) == f"the URL parameter group='a&b c' contains ' &', {RAW}"


def test_an_interface_a_url_cannot_carry_is_refused_naming_it() -> None:
    for interface in ("", "a&b", "a b"):
        with pytest.raises(ValueError) as error:
            ServiceURL(interface, "h", 1).to_string()
        assert str(error.value) == f"{interface!r} is not an interface name a URL can carry"
    # a "/" fits the URL's path, but not the raw value of its interface key
    with pytest.raises(ValueError) as error:
        ServiceURL("a/b", "h", 1).to_string()
    assert str(error.value) == f"the URL parameter interface='a/b' contains '/', {RAW}"


# --- what a URL is read as ------------------------------------------------------------


def test_keys_absent_or_empty_read_as_their_defaults() -> None:
    """Dubbo's ``URL.getParameter(key, default)``: an empty value is no value."""
    for query in ("", "?weight=&callbacks=&timestamp=&release="):
        url = ServiceURL.parse(f"backchannel://h:1/demo.Echo{query}")
        assert url == ServiceURL("demo.Echo", "h", 1)
        assert (url.weight, url.callbacks, url.timestamp, url.release) == (
            DEFAULT_WEIGHT,
            None,
            0,
            "",
        )


def test_the_interface_key_wins_over_the_path_and_the_path_serves_without_it() -> None:
    """Dubbo's ``getServiceInterface()``: the ``interface`` key, else the path."""
    assert ServiceURL.parse("dubbo://h:1/some/path?interface=demo.Echo").interface == "demo.Echo"
    for name in ("demo.Echo", "XmlService", "/demo.Echo"):
        assert ServiceURL.parse(f"backchannel://h:1/{name}").interface == name.lstrip("/")


def test_a_value_is_everything_after_the_first_equals_sign() -> None:
    """As Dubbo's URL parser splits a pair: a Java provider's value may hold ``=``."""
    url = ServiceURL.parse("dubbo://h:1/demo.Echo?token=a=b&weight=3")
    assert dict(url.parameters) == {"token": "a=b"} and url.weight == 3


def test_the_side_key_wins_and_the_scheme_decides_without_it() -> None:
    assert ServiceURL.parse("backchannel://h:1/demo.Echo").side == "provider"
    without_key = ServiceURL.parse("consumer://h/demo.Echo")
    assert (without_key.side, without_key.port, without_key.category) == (
        "consumer",
        0,
        "consumers",
    )
    with_key = ServiceURL.parse("dubbo://h/demo.Echo?side=consumer")
    assert (with_key.side, with_key.port) == ("consumer", 0)
    assert ServiceURL.parse("consumer://h:1/demo.Echo?side=provider").side == "provider"


def test_bad_urls_are_refused_with_the_whole_message_quoting_the_url() -> None:
    assert refused("consumer:///demo.Echo") == (
        "not a service URL (no scheme://host): 'consumer:///demo.Echo'"
    )
    assert refused("backchannel://h:1/") == (
        "not a service URL (no interface): 'backchannel://h:1/'"
    )
    assert refused("backchannel://h/demo.Echo") == (
        "a provider URL needs a port in 1..65535, not 0: 'backchannel://h/demo.Echo'"
    )
    # the reason in the brackets is urllib's own
    assert re.fullmatch(
        r"not a service URL \(.*'8x'.*\): 'backchannel://h:8x/demo\.Echo'",
        refused("backchannel://h:8x/demo.Echo"),
    )


def test_bad_numbers_are_refused_with_the_whole_message_quoting_the_url() -> None:
    base = "backchannel://h:1/demo.Echo?"
    for query, problem in (
        ("weight=X5", "weight='X5' is not a number"),
        ("weight=-X5", "weight='-X5' is not a number"),
        ("callbacks=many", "callbacks='many' is not a number"),
        ("timestamp=-1", "timestamp='-1' is out of its bounds 0..9223372036854775807"),
        ("callbacks=2147483648", "callbacks='2147483648' is out of its bounds 0..2147483647"),
    ):
        assert refused(base + query) == f"the URL parameter {problem}: '{base}{query}'"


def test_the_value_is_quoted_cut_at_40_characters_and_the_url_at_200() -> None:
    base = "backchannel://h:1/demo.Echo?"
    word, number = "a" * 100, "9" + "0" * 300
    assert refused(f"{base}weight={word}") == (
        f"the URL parameter weight='{'a' * 40}...[60 more characters cut]' is not a number: "
        f"'{base}weight={word}'"
    )
    text = f"{base}weight={number}"
    assert len(text) > 200
    assert refused(text) == (
        f"the URL parameter weight='9{'0' * 39}...[261 more characters cut]' is out of its "
        f"bounds 0..{MAX_WEIGHT}: '{text[:200]}...[{len(text) - 200} more characters cut]'"
    )


def test_a_name_that_is_not_utf_8_does_not_decode() -> None:
    """A znode whose name's escapes are not UTF-8 is not a URL, so it is skipped with a
    warning (a ValueError to the watch), not read with replacement characters."""
    with pytest.raises(ValueError, match="can't decode byte 0xff"):
        decode("backchannel%3A%2F%2Fh%3A1%2Fdemo.Echo%3Fapplication%3D%FF")


# --- matching ---------------------------------------------------------------------------


def test_a_consumer_that_names_no_group_or_version_matches_a_provider_without_them() -> None:
    url = ServiceURL.provider("demo.Echo", "h", 1)
    assert url.matches("demo.Echo")
    assert not ServiceURL.provider("demo.Echo", "h", 1, group="cn").matches("demo.Echo")
    assert not ServiceURL.provider("demo.Echo", "h", 1, version="1").matches("demo.Echo")


def test_interface_star_matches_any_interface() -> None:
    """Dubbo's ``UrlUtils.isMatch``: ``*`` as the consumer's interface."""
    url = ServiceURL.provider("demo.Echo", "h", 1, group="cn", version="1.0.0")
    assert url.matches("*", "cn", "1.0.0")
    assert not url.matches("*", "us", "1.0.0")


# --- the static registry and open_registry --------------------------------------------------


def test_a_static_subscription_follows_what_was_asked_with_the_consumers_group_and_version() -> (
    None
):
    registry = StaticRegistry("127.0.0.1:1,127.0.0.1:2")
    subscription = registry.subscribe("demo.Echo", group="cn", version="1.0.0")
    assert (subscription.interface, subscription.group, subscription.version) == (
        "demo.Echo",
        "cn",
        "1.0.0",
    )
    assert subscription.providers == {
        ServiceURL("demo.Echo", "127.0.0.1", port, group="cn", version="1.0.0") for port in (1, 2)
    }
    plain = registry.subscribe("demo.Echo")
    assert (plain.group, plain.version) == ("", "")
    assert {(u.interface, u.group, u.version) for u in plain.providers} == {("demo.Echo", "", "")}
    assert all(plain.matches(url) for url in plain.providers)


def test_a_static_registry_records_what_is_registered() -> None:
    registry = StaticRegistry("h:1")
    first = ServiceURL.provider("demo.Echo", "10.0.0.7", 50051)
    second = ServiceURL.provider("demo.Other", "10.0.0.7", 50051)
    assert registry.registered == set()
    registry.register(first)
    registry.register(second)
    assert registry.registered == {first, second}
    registry.unregister(first)
    registry.unregister(first)  # not registered any more: nothing happens
    assert registry.registered == {second}
    registry.close()
    assert registry.registered == set()


def test_an_empty_static_list_is_refused_with_the_whole_message() -> None:
    for address in ("", " , ", "static://"):
        with pytest.raises(ValueError) as error:
            open_registry(address)
        assert str(error.value) == "a static registry needs at least one host:port"


def test_an_unknown_registry_is_named_by_its_scheme_alone() -> None:
    """The scheme is what comes before the first ``://``, even when the rest holds one."""
    address = "nacos://127.0.0.1:8848?backup=static://h:1"
    with pytest.raises(ValueError) as error:
        open_registry(address)
    assert str(error.value) == f"unknown registry nacos:// in {address!r} (zookeeper://, static://)"


def test_open_registry_gives_a_zookeeper_address_and_its_options_to_the_registry() -> None:
    """No server there: the registry gives up after the ``connect_timeout`` passed on."""
    address = free_address()
    started = time.monotonic()
    with pytest.raises(RegistryError) as error:
        open_registry(f"zookeeper://{address}", connect_timeout=0.2)
    assert str(error.value) == f"ZooKeeper at {address} did not answer within 0.2 s"
    assert time.monotonic() - started < 5
