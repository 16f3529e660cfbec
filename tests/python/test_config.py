"""Settings: precedence flags > SPENDGATE_* env > TOML file > defaults, and clear errors for bad input."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from spendgate import config
from spendgate.config import ConfigError, Settings, load_settings

CORE_STUB = Path(config.__file__).with_name("_core.pyi")


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spendgate.toml"
    path.write_text(text)
    return path


def engine_stub_defaults() -> dict[str, object]:
    """The keyword defaults of Engine.__new__ in _core.pyi (stubtest holds it to the compiled core)."""
    tree = ast.parse(CORE_STUB.read_text())
    engine = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Engine")
    new = next(n for n in engine.body if isinstance(n, ast.FunctionDef) and n.name == "__new__")
    # Constant arithmetic such as 7 * 86_400_000 is allowed in a stub, so evaluate it (no names, no builtins).
    return {
        arg.arg: eval(ast.unparse(default), {"__builtins__": {}})  # noqa: S307
        for arg, default in zip(new.args.kwonlyargs, new.args.kw_defaults, strict=True)
        if default is not None
    }


# -- defaults ---------------------------------------------------------------------------------------------------------


def test_engine_settings_have_the_names_and_defaults_of_the_engine() -> None:
    defaults = engine_stub_defaults()
    assert list(defaults) == list(config.ENGINE_SETTINGS)
    for name, default in defaults.items():
        assert config.FIELDS[name].default == default, name


def test_defaults_apply_when_no_source_sets_a_value() -> None:
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.listen == "127.0.0.1:50051"
    assert settings.data_dir == "./spendgate-data"
    assert settings.reflection is True


def test_engine_kwargs_hold_every_engine_setting_and_nothing_else() -> None:
    kwargs = Settings(map_size_mb=9).engine_kwargs()
    assert set(kwargs) == set(config.ENGINE_SETTINGS)
    assert kwargs["map_size_mb"] == 9
    assert "data_dir" not in kwargs  # the engine's positional argument


# -- precedence -------------------------------------------------------------------------------------------------------


def test_config_file_overrides_defaults(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'data_dir = "/var/lib/spendgate"\nmap_size_mb = 64\nreflection = false\n')
    settings = load_settings(env={}, config_file=path)
    assert settings.data_dir == "/var/lib/spendgate"
    assert settings.map_size_mb == 64
    assert settings.reflection is False
    assert settings.listen == Settings().listen


def test_env_var_overrides_config_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "map_size_mb = 64\nmax_budgets = 5\n")
    settings = load_settings(env={"SPENDGATE_MAP_SIZE_MB": "128"}, config_file=path)
    assert settings.map_size_mb == 128
    assert settings.max_budgets == 5


def test_flag_overrides_env_var() -> None:
    settings = load_settings(flags={"durability": "relaxed"}, env={"SPENDGATE_DURABILITY": "fsync"})
    assert settings.durability == "relaxed"


def test_flag_given_as_none_is_not_given() -> None:
    settings = load_settings(flags={"durability": None}, env={"SPENDGATE_DURABILITY": "relaxed"})
    assert settings.durability == "relaxed"


def test_config_file_is_found_through_spendgate_config(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "max_ttl_ms = 1000\n")
    settings = load_settings(env={"SPENDGATE_CONFIG": str(path)})
    assert settings.max_ttl_ms == 1000


def test_config_flag_wins_over_spendgate_config(tmp_path: Path) -> None:
    chosen = write_toml(tmp_path, "max_ttl_ms = 1000\n")
    ignored = tmp_path / "ignored.toml"
    ignored.write_text("max_ttl_ms = 2000\n")
    settings = load_settings(env={"SPENDGATE_CONFIG": str(ignored)}, config_file=chosen)
    assert settings.max_ttl_ms == 1000


# -- values from text -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("0", False), ("No", False), (" on ", True)])
def test_env_var_booleans_accept_the_usual_words(text: str, expected: bool) -> None:
    assert load_settings(env={"SPENDGATE_REFLECTION": text}).reflection is expected


def test_env_var_integers_accept_underscores() -> None:
    assert load_settings(env={"SPENDGATE_MAX_BUDGETS": "1_000"}).max_budgets == 1000


def test_other_environment_variables_are_ignored() -> None:
    assert load_settings(env={"HOME": "/root", "SPENDGATEWAY": "x"}) == Settings()


# -- errors -----------------------------------------------------------------------------------------------------------


def test_unknown_key_in_config_file_names_the_key_the_file_and_the_line(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'listen = "127.0.0.1:1"\n\ndatadir = "/tmp/x"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, config_file=path)
    message = str(caught.value)
    assert "'datadir'" in message
    assert str(path) in message
    assert "line 3" in message
    assert "data_dir" in message  # the known settings are listed, so the typo is easy to spot


def test_table_in_config_file_is_an_unknown_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nlisten = 'x'\n")
    with pytest.raises(ConfigError, match=r"line 1: unknown setting 'server'"):
        load_settings(env={}, config_file=path)


def test_wrong_type_in_config_file_names_the_key_and_line(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'map_size_mb = "64"\n')
    with pytest.raises(ConfigError, match=r"line 1: setting 'map_size_mb': expected an integer, got str '64'"):
        load_settings(env={}, config_file=path)


def test_boolean_in_config_file_is_not_an_integer(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "max_budgets = true\n")
    with pytest.raises(ConfigError, match="'max_budgets': expected an integer, got bool"):
        load_settings(env={}, config_file=path)


def test_invalid_toml_names_the_file_and_the_position(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "listen = \n")
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 1"):
        load_settings(env={}, config_file=path)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_settings(env={}, config_file=tmp_path / "absent.toml")


def test_unknown_spendgate_env_var_is_an_error_naming_it() -> None:
    with pytest.raises(
        ConfigError, match=r"environment variable SPENDGATE_DATADIR: unknown setting.*SPENDGATE_DATA_DIR"
    ):
        load_settings(env={"SPENDGATE_DATADIR": "/tmp/x"})


def test_bad_env_value_names_the_variable_and_the_value() -> None:
    with pytest.raises(
        ConfigError, match=r"environment variable SPENDGATE_MAP_SIZE_MB: expected an integer, got '1GB'"
    ):
        load_settings(env={"SPENDGATE_MAP_SIZE_MB": "1GB"})


def test_bad_env_boolean_is_an_error() -> None:
    with pytest.raises(ConfigError, match="SPENDGATE_REFLECTION: expected a boolean"):
        load_settings(env={"SPENDGATE_REFLECTION": "maybe"})


def test_bad_choice_lists_the_choices(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'durability = "sometimes"\n')
    with pytest.raises(ConfigError, match="expected one of fsync, relaxed, got 'sometimes'"):
        load_settings(env={}, config_file=path)


def test_negative_integer_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"SPENDGATE_DEFAULT_TTL_MS: expected an integer >= 0, got -1"):
        load_settings(env={"SPENDGATE_DEFAULT_TTL_MS": "-1"})


def test_zero_is_rejected_where_a_setting_needs_at_least_one() -> None:
    with pytest.raises(ConfigError, match=r"SPENDGATE_MAX_CONCURRENT_RPCS: expected an integer >= 1, got 0"):
        load_settings(env={"SPENDGATE_MAX_CONCURRENT_RPCS": "0"})


def test_settings_constructed_directly_are_validated_too() -> None:
    with pytest.raises(ConfigError, match="setting 'log_level': expected one of"):
        Settings(log_level="loud")


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().listen = "0.0.0.0:1"  # type: ignore[misc]


# -- documentation ----------------------------------------------------------------------------------------------------


def test_every_setting_has_a_one_line_doc() -> None:
    for name in config.FIELDS:
        assert config.doc(name).strip(), name
        assert "\n" not in config.doc(name), name


def test_settings_table_has_a_row_per_setting() -> None:
    table = config.settings_table_markdown().splitlines()
    assert len(table) == 2 + len(config.FIELDS)
    for name, row in zip(config.FIELDS, table[2:], strict=True):
        assert row.startswith(f"| `{name}` | `{config.flag(name)}`")
        assert f"`{config.env_var(name)}`" in row


# -- Stripe and webhook settings: Stripe's own variable names, a table setting, secrets --------------------------------


def test_stripe_settings_come_from_stripes_own_variable_names() -> None:
    settings = load_settings(
        env={
            "STRIPE_API_KEY": "rk_test_abc",
            "STRIPE_API_BASE": "http://127.0.0.1:1",
            "STRIPE_WEBHOOK_SECRET": "whsec_1",
        }
    )
    assert (settings.stripe_api_key, settings.stripe_api_base, settings.webhook_secret) == (
        "rk_test_abc",
        "http://127.0.0.1:1",
        "whsec_1",
    )
    assert config.env_var("webhook_secret") == "STRIPE_WEBHOOK_SECRET"
    with pytest.raises(ConfigError, match="SPENDGATE_WEBHOOK_SECRET: unknown setting"):
        load_settings(env={"SPENDGATE_WEBHOOK_SECRET": "whsec_1"})


def test_secrets_stay_out_of_repr_and_optional_strings_may_be_empty() -> None:
    settings = Settings(stripe_api_key="sk_test_secret", webhook_secret="whsec_secret")
    shown = repr(settings)
    # The values and the secret settings' names (usage_link_secret_file is a path, not a secret: it is shown).
    assert "sk_test_secret" not in shown and "whsec_secret" not in shown
    assert "stripe_api_key" not in shown and "webhook_secret=" not in shown
    assert Settings().webhook_listen == "" and Settings().stripe_api_key == ""
    with pytest.raises(ConfigError, match="'listen': expected a non-empty string"):
        Settings(listen="")


def test_plan_limits_from_a_toml_table_a_json_variable_or_a_mapping(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[webhook_plan_limits]\nprice_basic = 1_000\n"pro monthly" = 50_000\n')
    from_file = load_settings(env={}, config_file=path).webhook_plan_limits
    assert dict(from_file) == {"price_basic": 1000, "pro monthly": 50000}
    from_env = load_settings(env={"SPENDGATE_WEBHOOK_PLAN_LIMITS": '{"price_basic": 1000, "pro monthly": 50000}'})
    assert from_env.webhook_plan_limits == from_file
    assert Settings(webhook_plan_limits={"b": 2, "a": 1}).webhook_plan_limits == (("a", 1), ("b", 2))
    assert hash(Settings(webhook_plan_limits={"a": 1}))  # still frozen and hashable


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1]", "expected a JSON object"),
        ("{bad", "expected a JSON object"),
        ('{"a": -1}', "integer >= 0 for 'a'"),
        ('{"a": "5"}', "integer >= 0 for 'a'"),
        ('{"a": true}', "integer >= 0 for 'a'"),
    ],
)
def test_bad_plan_limits_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"SPENDGATE_WEBHOOK_PLAN_LIMITS: .*{message}"):
        load_settings(env={"SPENDGATE_WEBHOOK_PLAN_LIMITS": text})


def test_a_plan_limit_table_with_a_bad_value_names_the_line_of_the_value(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'listen = "127.0.0.1:1"\n[webhook_plan_limits]\nprice_ok = 1\nprice_basic = 1.5\n')
    with pytest.raises(ConfigError, match=r"line 4: setting 'webhook_plan_limits': expected an integer >= 0"):
        load_settings(env={}, config_file=path)


def test_payment_failed_action_is_a_choice() -> None:
    assert Settings().webhook_payment_failed_action == "flag"
    with pytest.raises(ConfigError, match="expected one of flag, freeze"):
        load_settings(env={"SPENDGATE_WEBHOOK_PAYMENT_FAILED_ACTION": "panic"})


def test_http_allowed_hosts_take_names_and_addresses_and_refuse_urls_and_ports() -> None:
    settings = Settings(http_allowed_hosts=" Spendgate.Internal, 10.0.0.7 ,[fd00::1], sidecar. ")
    assert config.allowed_hosts(settings) == {"spendgate.internal", "10.0.0.7", "fd00::1", "sidecar"}
    for bad in (
        "https://spendgate.internal",
        "spendgate.internal:9100",
        "dead.beef:9100",
        "spend gate",
        "*.example",
        "a/b",
    ):
        with pytest.raises(ConfigError, match="http_allowed_hosts.*not a host name or an IP address"):
            Settings(http_allowed_hosts=bad)


def test_http_frame_ancestors_cannot_end_the_policy_early() -> None:
    assert Settings(http_frame_ancestors="'self' https://app.example.com").http_frame_ancestors.startswith("'self'")
    for bad in ("'none'; script-src *", "https://a.example, https://b.example", " ", "x\r\nSet-Cookie: a=b"):
        with pytest.raises(ConfigError, match="http_frame_ancestors"):
            Settings(http_frame_ancestors=bad)


def test_the_session_and_watcher_limits_have_floors() -> None:
    with pytest.raises(ConfigError, match="http_session_ttl_ms.*>= 1000"):
        Settings(http_session_ttl_ms=999)
    for name in ("http_max_sessions", "alert_max_watchers_per_client"):
        with pytest.raises(ConfigError, match=name):
            Settings(**{name: 0})
