"""JSON Schema validation that is safe on a spec's schema and a model's output (draft 2020-12).

jsonschema as shipped fetches a `$ref` URI it does not know (http, https, file: its deprecated
remote resolution) and evaluates `pattern` and `patternProperties` with Python's backtracking
`re`, so `^(a+)+$` against "aaa...a!" pins a CPU. Here:

- references resolve only inside the schema (and to the bundled metaschemas); anything else is
  refused without being fetched (`LOCAL_ONLY`);
- `pattern`, `patternProperties` (and the keywords that consult it: `additionalProperties`,
  `unevaluatedProperties`) and the `regex` format run on RE2, which is linear-time; a pattern
  RE2 refuses (backreferences, lookaround) is `SchemaUnusable`, never a fallback to `re`;
- every subschema is validated as draft 2020-12: jsonschema's `evolve` would switch to a stock
  validator class (which uses `re`) at a nested `$schema`.

`validator()` is what the json scorer runs; `check_schema()` is the matching check for spec
validation.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import attrs
import jsonschema
import re2
import referencing
import referencing.exceptions
from jsonschema import Draft202012Validator, ValidationError
from jsonschema.protocols import Validator
from jsonschema_specifications import REGISTRY as METASCHEMAS
from referencing.jsonschema import DRAFT202012, SchemaResource

Schema = Any  # a JSON object or a boolean


class SchemaUnusable(ValueError):
    """The schema cannot be used here: a reference outside it, or a pattern RE2 refuses."""


def _refuse(uri: str) -> SchemaResource:
    raise referencing.exceptions.NoSuchResource(ref=uri)  # type: ignore[call-arg]


# Knows no documents and fetches none; jsonschema adds the bundled metaschemas to it.
LOCAL_ONLY: referencing.Registry[Any] = referencing.Registry(retrieve=_refuse)  # type: ignore[call-arg]


@functools.lru_cache(maxsize=1024)
def re2_pattern(pattern: str) -> Any:
    """The compiled RE2 pattern, or SchemaUnusable saying why RE2 refuses it.

    >>> bool(re2_pattern("^(a+)+$").search("a" * 100_000 + "!"))
    False
    >>> re2_pattern("(?=a)b")
    Traceback (most recent call last):
    ...
    services.specs.json_schema.SchemaUnusable: pattern '(?=a)b' is not valid RE2 (invalid \
perl operator: (?=); backreferences and lookaround are unsupported
    """
    options = re2.Options()
    options.log_errors = False  # the reason goes back to the caller, not to stderr
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        why = f"pattern {pattern!r} is not valid RE2 ({detail}); "
        raise SchemaUnusable(why + "backreferences and lookaround are unsupported") from None


def _matches_any(patterns: Any, key: str) -> bool:
    return any(re2_pattern(p).search(key) for p in patterns)


def _no_errors(errors: Iterator[ValidationError]) -> bool:
    return next(errors, None) is None


def _listed(keys: list[Any]) -> str:
    verb = "was" if len(keys) == 1 else "were"
    return f"{', '.join(repr(k) for k in keys)} {verb}"


# Keywords that match regular expressions, as jsonschema's own but on RE2 ---------------------


def _pattern(validator: Validator, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not re2_pattern(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Validator, patterns: Any, instance: Any, schema: Any) -> Any:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        regex = re2_pattern(pattern)
        for key, value in instance.items():
            if regex.search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Validator, extra: Any, instance: Any, schema: Any) -> Any:
    if not validator.is_type(instance, "object"):
        return
    named, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
    extras = sorted(k for k in instance if k not in named and not _matches_any(patterns, k))
    if validator.is_type(extra, "object"):
        for key in extras:
            yield from validator.descend(instance[key], extra, path=key)
    elif not extra and extras:
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            keys, listed = ", ".join(map(repr, extras)), ", ".join(map(repr, sorted(patterns)))
            yield ValidationError(f"{keys} {verb} not match any of the regexes: {listed}")
        else:
            listed = _listed(extras)
            yield ValidationError(f"Additional properties are not allowed ({listed} unexpected)")


def _unevaluated_properties(validator: Validator, rest: Any, instance: Any, schema: Any) -> Any:
    if not validator.is_type(instance, "object"):
        return
    evaluated = set(_evaluated_keys(validator, instance, schema))
    bad = [
        key
        for key in instance
        if key not in evaluated
        and not _no_errors(validator.descend(instance[key], rest, path=key, schema_path=key))
    ]
    if bad and rest is False:
        listed = _listed(sorted(bad, key=str))
        yield ValidationError(f"Unevaluated properties are not allowed ({listed} unexpected)")
    elif bad:
        yield ValidationError(
            "Unevaluated properties are not valid under the given schema "
            f"({_listed(bad)} unevaluated and invalid)"
        )


def _evaluated_keys(validator: Validator, instance: Any, schema: Any) -> list[Any]:
    """The instance's keys some keyword of `schema` evaluated (jsonschema's
    find_evaluated_property_keys_by_schema, with RE2 for patternProperties)."""
    if validator.is_type(schema, "boolean"):
        return []
    keys: list[Any] = []
    for keyword in ("$ref", "$dynamicRef"):
        if (ref := schema.get(keyword)) is not None:
            # jsonschema has no public lookup; its own keyword functions use _resolver too.
            resolved = validator._resolver.lookup(ref)  # type: ignore[attr-defined]
            inner = validator.evolve(schema=resolved.contents, _resolver=resolved.resolver)
            keys += _evaluated_keys(inner, instance, resolved.contents)
    if validator.is_type(properties := schema.get("properties"), "object"):
        keys += properties.keys() & instance.keys()
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        if (sub := schema.get(keyword)) is not None:
            keys += [k for k, v in instance.items() if _no_errors(validator.descend(v, sub))]
    patterns = schema.get("patternProperties", {})
    keys += [k for k in instance if _matches_any(patterns, k)]
    return keys + _evaluated_by_applicators(validator, instance, schema)


def _evaluated_by_applicators(validator: Validator, instance: Any, schema: Any) -> list[Any]:
    keys: list[Any] = []
    for key, sub in schema.get("dependentSchemas", {}).items():
        if key in instance:
            keys += _evaluated_keys(validator, instance, sub)
    for keyword in ("allOf", "oneOf", "anyOf"):
        for sub in schema.get(keyword, []):
            if _no_errors(validator.descend(instance, sub)):
                keys += _evaluated_keys(validator, instance, sub)
    if "if" in schema:
        if validator.evolve(schema=schema["if"]).is_valid(instance):
            keys += _evaluated_keys(validator, instance, schema["if"])
            keys += _evaluated_keys(validator, instance, schema.get("then", True))
        else:
            keys += _evaluated_keys(validator, instance, schema.get("else", True))
    return keys


def _evolve_as_2020_12(self: Any, **changes: Any) -> Any:
    """jsonschema's `evolve` without `validator_for`: a nested `$schema` would otherwise switch
    to a stock validator class, and with it back to `re`."""
    changes.setdefault("schema", self.schema)
    for field in attrs.fields(type(self)):
        if field.init and field.alias not in changes:
            changes[field.alias] = getattr(self, field.name)
    return type(self)(**changes)


SafeValidator: Any = jsonschema.validators.extend(
    Draft202012Validator,
    {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
        "unevaluatedProperties": _unevaluated_properties,
    },
)
SafeValidator.evolve = _evolve_as_2020_12

# The `regex` format on RE2 (metaschema checks of `pattern` and `patternProperties` keys).
RE2_FORMATS = jsonschema.FormatChecker(Draft202012Validator.FORMAT_CHECKER.checkers)
RE2_FORMATS.checks("regex", raises=SchemaUnusable)(lambda value: bool(re2_pattern(value)))


# Static checks --------------------------------------------------------------------------------


def _subschemas(schema: Schema) -> Iterator[tuple[Any, Any]]:
    """Every subschema in an applicator position, with the resolver for its base URI."""
    root = DRAFT202012.create_resource(schema)
    # The registry jsonschema builds for SafeValidator: the bundled metaschemas, then LOCAL_ONLY.
    stack = [(root, METASCHEMAS.combine(LOCAL_ONLY).resolver_with_root(root))]
    while stack:
        resource, resolver = stack.pop()
        yield resource.contents, resolver
        for contents in DRAFT202012.subresources_of(resource.contents):
            sub = DRAFT202012.create_resource(contents)
            stack.append((sub, resolver.in_subresource(sub)))


def _check_subschema(contents: Any, resolver: Any) -> None:
    if not isinstance(contents, dict):
        return
    for keyword in ("$ref", "$dynamicRef"):
        if isinstance(ref := contents.get(keyword), str):
            try:
                resolver.lookup(ref)
            except referencing.exceptions.Unresolvable:
                raise SchemaUnusable(
                    f"{keyword} {ref!r} does not resolve inside the schema; references to "
                    "other documents (http, file, ...) are not followed"
                ) from None
    if isinstance(pattern := contents.get("pattern"), str):
        re2_pattern(pattern)
    for pattern in contents.get("patternProperties") or {}:
        re2_pattern(pattern)


def _check_static(schema: Schema) -> None:
    """References and patterns checked up front, so every sample gets the same answer (lazily
    a reference behind an `anyOf` branch is only reached by some)."""
    for contents, resolver in _subschemas(schema):
        _check_subschema(contents, resolver)


@functools.lru_cache(maxsize=256)
def validator(schema_json: str) -> Validator:
    """The validator for a schema given as JSON text; SchemaUnusable for a reference outside it
    or a pattern RE2 refuses. References that only a pointer reaches are refused when used.

    >>> validator('{"$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n"}').is_valid(3)
    True
    >>> validator('{"$ref": "https://example.com/s.json"}')
    Traceback (most recent call last):
    ...
    services.specs.json_schema.SchemaUnusable: $ref 'https://example.com/s.json' does not \
resolve inside the schema; references to other documents (http, file, ...) are not followed
    """
    schema = json.loads(schema_json)
    _check_static(schema)
    return SafeValidator(schema, registry=LOCAL_ONLY)  # type: ignore[no-any-return]


def check_schema(schema: Schema) -> None:
    """For spec validation: jsonschema.SchemaError (with `absolute_path`) when `schema` is not a
    draft 2020-12 schema, its patterns checked as RE2; SchemaUnusable for a reference outside it.
    """
    meta = SafeValidator(
        Draft202012Validator.META_SCHEMA, registry=LOCAL_ONLY, format_checker=RE2_FORMATS
    )
    error = jsonschema.exceptions.best_match(meta.iter_errors(schema))
    if error is not None:
        raise jsonschema.SchemaError.create_from(error)
    _check_static(schema)
