"""The config file's pure parser: values that pass validation must work. Keys and header values
are checked for what would break (or split) the HTTP header they travel in, and no message
ever shows a secret."""

import math

import pytest

from claude_router import config
from claude_router.config import ConfigError

SECRET = "sk-secret-9c8b7a"
SRC = "router.yaml"


def doc(**endpoint) -> dict:
    """A config with one valid endpoint (aws) and a second one (droid) carrying `endpoint`."""
    return {"endpoints": [{"name": "aws", "url": "https://relay.example/aws"},
                          {"name": "droid", "url": "https://relay.example/droid", **endpoint}]}


def refused(d: dict, env: dict | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        config.parse(d, SRC, env or {})
    return str(exc.value)


def assert_names_field_not_secret(message: str, field: str, secret: str = SECRET) -> None:
    assert message.startswith(f"{SRC}: {field}: "), message
    assert secret not in message and secret.strip() not in message


# --- what passes ---

def test_valid_config_parses_keys_headers_and_prices():
    d = doc(key="env:DROID", auth="bearer", headers={"X-Relay-Tier": "droid", "X-Num": 3, "X-Tab": "a\tb"},
            price={"input": 2, "output": 10.5, "cache_read": 0})
    d["client_keys"] = [SECRET]
    cfg = config.parse(d, SRC, {"DROID": "sk-droid-1"})
    droid = cfg.endpoints[1]
    assert droid.key == "sk-droid-1" and droid.auth == "bearer"
    assert droid.headers == (("X-Relay-Tier", "droid"), ("X-Num", "3"), ("X-Tab", "a\tb"))
    assert (droid.price.input, droid.price.output, droid.price.cache_read) == (2.0, 10.5, 0.0)
    assert cfg.client_keys == (SECRET,)


def test_empty_header_value_is_allowed():
    assert config.parse(doc(headers={"X-Empty": ""}), SRC, {}).endpoints[1].headers == (("X-Empty", ""),)


# --- prices ---

@pytest.mark.parametrize("value, got", [(math.nan, "got NaN"), (math.inf, "got infinity"),
                                        (-math.inf, "got -infinity")])
def test_price_refuses_nan_and_infinity(value, got):
    message = refused(doc(price={"input": 1.0, "output": value}))
    assert message == f"{SRC}: endpoints[1] (droid).price.output: must be a number >= 0 (USD per million tokens), {got}"


def test_price_refuses_an_integer_too_large_for_a_float():
    message = refused(doc(price={"input": 10 ** 400}))
    assert message.startswith(f"{SRC}: endpoints[1] (droid).price.input: must be a number >= 0")
    assert "infinity" in message


def test_price_refuses_negatives():
    assert refused(doc(price={"cache_write": -0.5})) == (
        f"{SRC}: endpoints[1] (droid).price.cache_write: must be a number >= 0 (USD per million tokens)")


def test_price_refuses_booleans_and_strings():
    assert "price.input: must be a number" in refused(doc(price={"input": True}))
    assert "price.input: must be a number" in refused(doc(price={"input": "1.5"}))


def test_price_from_yaml_nan_and_inf_is_refused(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text("endpoints:\n  - name: aws\n    url: https://relay.example/aws\n"
                    "    price: {input: .nan, output: 1}\n")
    with pytest.raises(ConfigError, match=r"endpoints\[0\] \(aws\)\.price\.input: .* got NaN"):
        config.load(str(path), {})
    path.write_text(path.read_text().replace(".nan", ".inf"))
    with pytest.raises(ConfigError, match=r"endpoints\[0\] \(aws\)\.price\.input: .* got infinity"):
        config.load(str(path), {})


# --- endpoint keys ---

@pytest.mark.parametrize("bad", ["\r\n", "\n", "\r", "\x00", "\x1b", "\x7f", "\x0b"])
def test_literal_key_with_a_control_character_is_refused(bad):
    key = f"sk-a{bad}{SECRET}"
    message = refused(doc(key=key))
    assert_names_field_not_secret(message, "endpoints[1] (droid).key")
    assert "contains a control character" in message
    assert "sk-a" not in message


def test_env_key_with_crlf_is_refused_naming_field_and_variable():
    message = refused(doc(key="env:DROID_KEY"), {"DROID_KEY": f"{SECRET}\r\nX-Injected: 1"})
    assert_names_field_not_secret(message, "endpoints[1] (droid).key")
    assert "contains a control character" in message and "DROID_KEY" in message
    assert "X-Injected" not in message


@pytest.mark.parametrize("key", [f"{SECRET} ", f" {SECRET}", f"\t{SECRET}", f"{SECRET}\u00a0"])
def test_key_with_surrounding_whitespace_is_refused(key):
    message = refused(doc(key=key))
    assert_names_field_not_secret(message, "endpoints[1] (droid).key")
    assert "leading or trailing whitespace" in message


def test_key_with_a_pasted_trailing_newline_is_refused():
    message = refused(doc(key="env:DROID_KEY"), {"DROID_KEY": SECRET + "\n"})
    assert_names_field_not_secret(message, "endpoints[1] (droid).key")


def test_key_with_non_ascii_is_refused():
    key = SECRET + "é"
    message = refused(doc(key=key))
    assert_names_field_not_secret(message, "endpoints[1] (droid).key", key)
    assert "non-ASCII" in message


def test_key_with_an_inner_tab_is_allowed():
    assert config.parse(doc(key="a\tb"), SRC, {}).endpoints[1].key == "a\tb"


# --- client keys ---

def test_client_key_with_a_control_character_is_refused():
    d = doc()
    d["client_keys"] = ["rk-fine", f"{SECRET}\x00"]
    message = refused(d)
    assert_names_field_not_secret(message, "client_keys[1]")
    assert "control character" in message


def test_client_key_from_env_with_trailing_newline_is_refused():
    d = doc()
    d["client_keys"] = ["env:ROUTER_CLIENT_KEY"]
    message = refused(d, {"ROUTER_CLIENT_KEY": f"{SECRET}\r\n"})
    assert_names_field_not_secret(message, "client_keys[0]")
    assert "ROUTER_CLIENT_KEY" in message


def test_client_key_with_non_ascii_is_refused():
    d = doc()
    d["client_keys"] = [f"{SECRET}ü"]
    message = refused(d)
    assert_names_field_not_secret(message, "client_keys[0]", f"{SECRET}ü")


def test_client_key_with_surrounding_space_is_refused():
    d = doc()
    d["client_keys"] = [f" {SECRET}"]
    assert_names_field_not_secret(refused(d), "client_keys[0]")


# --- endpoint headers ---

@pytest.mark.parametrize("bad", ["\r\n", "\n", "\x00", "\x01", "\x7f"])
def test_header_value_with_a_control_character_is_refused(bad):
    message = refused(doc(headers={"X-Token": f"{SECRET}{bad}evil: 1"}))
    assert_names_field_not_secret(message, "endpoints[1] (droid).headers.X-Token")
    assert "control character" in message and "evil" not in message


def test_header_value_with_non_ascii_is_refused():
    value = f"{SECRET}\u2603"
    message = refused(doc(headers={"X-Token": value}))
    assert_names_field_not_secret(message, "endpoints[1] (droid).headers.X-Token", value)
    assert "non-ASCII" in message


def test_header_value_with_surrounding_whitespace_is_refused():
    message = refused(doc(headers={"X-Token": f"{SECRET} "}))
    assert_names_field_not_secret(message, "endpoints[1] (droid).headers.X-Token")


@pytest.mark.parametrize("name", ["X Token", "X-Token:", "", "X\r\nY", "Ünicode", "(x)", ":authority"])
def test_header_name_that_is_not_a_token_is_refused(name):
    message = refused(doc(headers={name: SECRET}))
    assert message.startswith(f"{SRC}: endpoints[1] (droid).headers: ") and "not a valid header name" in message
    assert SECRET not in message and "\r" not in message and "\n" not in message


@pytest.mark.parametrize("name", ["Host", "content-length", "Transfer-Encoding", "Connection", "keep-alive",
                                  "TE", "Upgrade", "Trailer", "Proxy-Authorization"])
def test_framing_and_hop_by_hop_header_names_are_refused(name):
    message = refused(doc(headers={name: SECRET}))
    assert_names_field_not_secret(message, f"endpoints[1] (droid).headers.{name}")
    assert "set by the router itself" in message


def test_header_name_that_is_not_a_string_is_refused():
    assert refused(doc(headers={1: "x"})) == (
        f"{SRC}: endpoints[1] (droid).headers: expected a mapping of header names to values")


def test_header_value_that_is_a_boolean_is_refused():
    assert "expected a mapping of header names to values" in refused(doc(headers={"X-Flag": True}))


def test_value_problem_is_usable_for_keys_given_as_options():
    assert config.value_problem(SECRET) is None
    for bad in (f"{SECRET}\r\n", f" {SECRET}", f"{SECRET}é", f"{SECRET}\x00"):
        problem = config.value_problem(bad)
        assert problem and SECRET not in problem


# --- misspelt names and out-of-range settings: named, with the closest known name ---

@pytest.mark.parametrize("d, message", [
    ({**doc(), "helth": {"cooldown": 5}}, "helth: unknown section (did you mean health?)"),
    ({**doc(), "health": {"coldown": 5}}, "health.coldown: unknown field (did you mean cooldown?)"),
    (doc(prise={"input": 1}), "endpoints[1].prise: unknown field (did you mean price?)"),
    (doc(price={"inptu": 1}), "endpoints[1] (droid).price.inptu: unknown field (did you mean input?)"),
    ({**doc(), "clients": [{"name": "alice", "key": SECRET, "budgte": {"usd": 1, "per": "day"}}]},
     "clients[0].budgte: unknown field (did you mean budget?)"),
])
def test_a_misspelt_name_is_refused_with_did_you_mean(d, message):
    assert refused(d) == f"{SRC}: {message}"


def test_a_name_close_to_nothing_lists_the_known_ones():
    assert refused({**doc(), "health": {"zzz": 1}}) == (
        f"{SRC}: health.zzz: unknown field (expected one of cooldown, max_failures, window_cap)")


@pytest.mark.parametrize("section, field, value, minimum", [
    ("health", "cooldown", -5, 1), ("health", "max_failures", 0, 1), ("timeouts", "connect", 0, 1),
    ("policy", "max_attempts", -1, 0), ("policy", "deadline", 0, 1), ("timeouts", "head", -1, 0),
])
def test_a_setting_below_its_option_minimum_names_the_field(section, field, value, minimum):
    assert refused({**doc(), section: {field: value}}) == (
        f"{SRC}: {section}.{field}: must be at least {minimum}, got {value}")


def test_settings_at_their_minimum_pass():
    cfg = config.parse({**doc(), "health": {"cooldown": 1}, "policy": {"max_attempts": 0}}, SRC, {})
    assert cfg.options == {"router_cooldown": 1, "router_max_attempts": 0}


# --- router.example.yaml: valid as shipped, and its commented clients once uncommented ---

def example_text() -> str:
    from pathlib import Path
    return (Path(__file__).resolve().parent.parent / "router.example.yaml").read_text()


EXAMPLE_ENV = {"AWS_RELAY_KEY": "k-aws", "DROID_RELAY_KEY": "k-droid", "ROUTER_CLIENT_KEY": "k-client",
               "ALICE_KEY": "k-alice", "CI_AGENT_KEY": "k-ci", "ROUTER_ADMIN_KEY": "k-admin"}


def parse_text(text: str) -> config.FileConfig:
    from ruamel.yaml import YAML
    return config.parse(YAML(typ="safe").load(text), SRC, EXAMPLE_ENV)


def test_the_example_parses_as_shipped():
    cfg = parse_text(example_text())
    assert [ep.name for ep in cfg.endpoints] == ["aws", "droid", "claude"]
    assert cfg.clients == () and cfg.admin_keys == ()


def test_the_examples_commented_clients_and_admin_keys_parse_once_uncommented():
    lines = example_text().splitlines()
    start = lines.index("# clients:")
    block = []
    for line in lines[start:]:
        if line.startswith("# ") and (line[2:3] in (" ", "-") or line[2:].split(":")[0] in ("clients", "admin_keys")):
            block.append(line[2:])
        elif line.startswith("#") or not line.strip():
            continue
        else:
            break
    cfg = parse_text(example_text() + "\n" + "\n".join(block) + "\n")
    alice, ci = cfg.clients
    assert (alice.name, alice.key, alice.rpm, alice.max_concurrency, alice.endpoints) == (
        "alice", b"k-alice", 60, 4, ("aws", "droid"))
    assert (alice.budget.usd, alice.budget.per) == (20.0, "day")
    assert (ci.name, ci.budget.per) == ("ci-agent", "month")
    assert cfg.admin_keys == ("k-admin",)


# --- load within a tier: weight and max_concurrency ---

def test_weight_and_max_concurrency_parse_with_defaults():
    cfg = config.parse(doc(weight=3, max_concurrency=4), SRC, {})
    aws, droid = cfg.endpoints
    assert (aws.weight, aws.max_concurrency) == (1.0, None)
    assert (droid.weight, droid.max_concurrency) == (3.0, 4)
    assert config.parse(doc(weight=0.5), SRC, {}).endpoints[1].weight == 0.5


@pytest.mark.parametrize("value", [0, -1, True, "2", math.inf, math.nan, 10 ** 400, None])
def test_weight_must_be_a_positive_number(value):
    message = refused(doc(weight=value))
    assert message.startswith(f"{SRC}: endpoints[1] (droid).weight: must be a positive number")
    assert "\n" not in message


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "4"])
def test_max_concurrency_must_be_a_positive_integer(value):
    message = refused(doc(max_concurrency=value))
    assert message.startswith(f"{SRC}: endpoints[1] (droid).max_concurrency: must be a whole number >= 1")
    assert "\n" not in message


def test_a_misspelt_max_concurrency_says_did_you_mean():
    assert "did you mean max_concurrency?" in refused(doc(max_concurency=4))
