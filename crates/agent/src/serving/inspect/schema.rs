//! Bounds on the JSON schemas a request carries (`json_schema`, `response_format`'s schema,
//! tool parameters). llama-server turns each into a grammar when the request arrives, and its
//! converter has weak spots the pinned engine cannot survive:
//!
//! - a `$ref` loop reached through `allOf` (or through references alone) recurses until the
//!   stack ends: SIGSEGV, every client's model gone;
//! - alternatives that reference the same definition twice, level after level, double the
//!   engine's left-recursion check per level (24 levels took 1.2 s, 40 would take days on the
//!   engine's main loop);
//! - `type` lists copy the schema per type, and many optional properties cost the cube of
//!   their number;
//! - `minItems`/`maxItems`/`minLength`/`maxLength` over 2000 fail or silently lose their bound.
//!
//! So: references must be local and may loop only through a structure (a property, an item:
//! a recursive type, which the converter handles), the paths from the root to the leaves,
//! following references, are counted, and the rest is bounded field by field.

use serde_json::Value;

use super::RequestRefusal;

/// A schema's text, serialized.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// Paths from the root to a leaf, references followed (loops cut).
pub const MAX_PATHS: u64 = 10_000;
/// References followed one inside another.
pub const MAX_REFERENCE_DEPTH: usize = 128;
/// Entries of a `type` list.
pub const MAX_TYPES: usize = 4;
/// Properties of one object.
pub const MAX_PROPERTIES: usize = 256;
/// `minItems`, `maxItems`, `minLength`, `maxLength`, `minProperties`, `maxProperties`.
pub const MAX_COUNT_BOUND: u64 = 2000;
/// A `pattern`'s length and its groups nested in one another: the converter walks a pattern
/// by recursion, one level per group.
pub const MAX_PATTERN_BYTES: usize = 1024;
pub const MAX_PATTERN_GROUPS: usize = 32;
/// A property's name: the converter recurses per character of the names it must exclude when
/// `additionalProperties` is set.
pub const MAX_PROPERTY_NAME_CHARS: usize = 256;

const COUNT_BOUNDS: [&str; 6] = ["minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties"];

/// How an edge of the schema graph is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edge {
    /// Into a property, an item, additional properties: a level of the value's structure.
    Structure,
    /// Into an alternative or a conjunct (`anyOf`, `oneOf`, `allOf`, `not`), or through `$ref`:
    /// the same level of the value.
    Same,
}

/// Checks one schema, found at `field` of the request.
pub fn check(field: &str, schema: &Value) -> Result<(), RequestRefusal> {
    let refuse = |problem: String, allowed: &str| RequestRefusal::Field {
        field: field.to_owned(),
        problem,
        allowed: allowed.to_owned(),
    };
    let size = schema.to_string().len();
    if size > MAX_SCHEMA_BYTES {
        return Err(refuse(format!("is a schema of {size} bytes"), "a schema of at most 64 KiB"));
    }
    let mut walk = Walk { root: schema, stack: Vec::new(), memo: std::collections::HashMap::new() };
    walk.paths(schema, String::new(), Edge::Structure).map_err(|problem| refuse(problem.0, problem.1))?;
    Ok(())
}

/// What was wrong, and what is allowed.
struct Problem(String, &'static str);

struct Walk<'a> {
    root: &'a Value,
    /// The nodes being visited (their pointers) and the edge that led into each.
    stack: Vec<(String, Edge)>,
    /// Paths below a node already counted.
    memo: std::collections::HashMap<String, u64>,
}

impl<'a> Walk<'a> {
    /// Paths from `node` (at `pointer`) to the leaves below it.
    fn paths(&mut self, node: &'a Value, pointer: String, via: Edge) -> Result<u64, Problem> {
        if let Some(at) = self.stack.iter().position(|(p, _)| *p == pointer) {
            // A loop: legitimate when a level of structure lies on it (a recursive type).
            let structural = self.stack[at + 1..].iter().any(|(_, e)| *e == Edge::Structure) || via == Edge::Structure;
            if !structural {
                return Err(Problem(
                    format!("has a `$ref` loop through {pointer:?} that never goes down a property or an item"),
                    "references that loop only through properties or items (a recursive type)",
                ));
            }
            return Ok(1);
        }
        if let Some(known) = self.memo.get(&pointer) {
            return Ok(*known);
        }
        if self.stack.len() >= MAX_REFERENCE_DEPTH {
            return Err(Problem(
                format!("nests schemas and references deeper than {MAX_REFERENCE_DEPTH} levels"),
                "at most 128 levels of nested schemas and references",
            ));
        }
        let Value::Object(map) = node else { return Ok(1) };
        check_node(map)?;
        self.stack.push((pointer.clone(), via));
        let mut total: u64 = 0;
        for (child, child_pointer, edge) in children(map, &pointer) {
            total = total.saturating_add(self.paths(child, child_pointer, edge)?);
            if total > MAX_PATHS {
                self.stack.pop();
                return Err(Problem(
                    format!("expands to more than {MAX_PATHS} paths through its alternatives and references"),
                    "a schema whose alternatives and references expand to at most 10000 paths",
                ));
            }
        }
        if let Some(Value::String(reference)) = map.get("$ref") {
            let target_pointer = local_pointer(reference).ok_or_else(|| {
                Problem(format!("has `$ref` {reference:?}"), "local references only (\"#\" or \"#/...\")")
            })?;
            let target = self.root.pointer(&target_pointer).ok_or_else(|| {
                Problem(
                    format!("has `$ref` {reference:?}, which points nowhere"),
                    "references to parts of the same schema",
                )
            })?;
            total = total.saturating_add(self.paths(target, target_pointer, Edge::Same)?);
        }
        self.stack.pop();
        let total = total.max(1);
        if total > MAX_PATHS {
            return Err(Problem(
                format!("expands to more than {MAX_PATHS} paths through its alternatives and references"),
                "a schema whose alternatives and references expand to at most 10000 paths",
            ));
        }
        self.memo.insert(pointer, total);
        Ok(total)
    }
}

/// Bounds of one schema object, by its own keys.
fn check_node(map: &serde_json::Map<String, Value>) -> Result<(), Problem> {
    if let Some(Value::Array(types)) = map.get("type")
        && types.len() > MAX_TYPES
    {
        return Err(Problem(
            format!("has a `type` list of {} entries", types.len()),
            "`type` lists of at most 4 entries",
        ));
    }
    if let Some(Value::Object(properties)) = map.get("properties") {
        if properties.len() > MAX_PROPERTIES {
            return Err(Problem(
                format!("has an object of {} properties", properties.len()),
                "objects of at most 256 properties",
            ));
        }
        if let Some(long) = properties.keys().find(|k| k.chars().count() > MAX_PROPERTY_NAME_CHARS) {
            return Err(Problem(
                format!("has a property name of {} characters", long.chars().count()),
                "property names of at most 256 characters",
            ));
        }
    }
    if let Some(Value::String(pattern)) = map.get("pattern") {
        let groups = pattern_depth(pattern);
        if pattern.len() > MAX_PATTERN_BYTES || groups > MAX_PATTERN_GROUPS {
            return Err(Problem(
                format!("has a `pattern` of {} bytes nesting {groups} groups", pattern.len()),
                "patterns of at most 1024 bytes and 32 nested groups",
            ));
        }
    }
    for key in COUNT_BOUNDS {
        let whole =
            |v: &Value| v.as_u64().or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64));
        if let Some(v) = map.get(key)
            && whole(v).is_none_or(|n| n > MAX_COUNT_BOUND)
        {
            return Err(Problem(
                format!("has `{key}` {v}"),
                "`minItems`, `maxItems`, `minLength`, `maxLength` of 0 to 2000",
            ));
        }
    }
    Ok(())
}

/// The sub-schemas of a schema object, with their pointers and how each is entered.
fn children<'a>(map: &'a serde_json::Map<String, Value>, pointer: &str) -> Vec<(&'a Value, String, Edge)> {
    let mut out = Vec::new();
    let at = |key: &str| format!("{pointer}/{}", escape(key));
    for (key, edge) in [("properties", Edge::Structure), ("patternProperties", Edge::Structure)] {
        if let Some(Value::Object(props)) = map.get(key) {
            for (name, sub) in props {
                out.push((sub, format!("{}/{}", at(key), escape(name)), edge));
            }
        }
    }
    for key in ["additionalProperties", "items", "contains", "unevaluatedItems", "unevaluatedProperties"] {
        match map.get(key) {
            Some(sub @ Value::Object(_)) => out.push((sub, at(key), Edge::Structure)),
            Some(Value::Array(subs)) => {
                out.extend(subs.iter().enumerate().map(|(i, s)| (s, format!("{}/{i}", at(key)), Edge::Structure)))
            }
            _ => {}
        }
    }
    if let Some(Value::Array(subs)) = map.get("prefixItems") {
        out.extend(subs.iter().enumerate().map(|(i, s)| (s, format!("{}/{i}", at("prefixItems")), Edge::Structure)));
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(subs)) = map.get(key) {
            out.extend(subs.iter().enumerate().map(|(i, s)| (s, format!("{}/{i}", at(key)), Edge::Same)));
        }
    }
    if let Some(sub @ Value::Object(_)) = map.get("not") {
        out.push((sub, at("not"), Edge::Same));
    }
    out
}

/// How deep a regular expression's groups nest (escaped parentheses and those in classes are
/// not groups).
fn pattern_depth(pattern: &str) -> usize {
    let (mut depth, mut deepest, mut escaped, mut in_class) = (0usize, 0usize, false, false);
    for c in pattern.chars() {
        match (escaped, in_class, c) {
            (true, _, _) => escaped = false,
            (false, _, '\\') => escaped = true,
            (false, false, '[') => in_class = true,
            (false, true, ']') => in_class = false,
            (false, false, '(') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, false, ')') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// A JSON pointer segment (RFC 6901).
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// The pointer of a local reference (`#` or `#/...`). A `~` is refused (None): the engine splits
/// references on `/` without decoding `~1` and `~0`, so a reference with them names one part of
/// the schema here and another in the engine.
fn local_pointer(reference: &str) -> Option<String> {
    let rest = reference.strip_prefix('#')?;
    (!rest.contains('~') && (rest.is_empty() || rest.starts_with('/'))).then(|| rest.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problem(schema: Value) -> String {
        check("json_schema", &schema).unwrap_err().to_string()
    }

    #[test]
    fn ordinary_and_recursive_schemas_pass() {
        let person = json!({"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 100},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
            "address": {"$ref": "#/$defs/address"}},
            "$defs": {"address": {"type": "object", "properties": {"city": {"type": ["string", "null"]}}}}});
        assert!(check("json_schema", &person).is_ok());
        // A tree: the loop goes down `children`, a level of structure.
        let tree = json!({"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}});
        assert!(check("json_schema", &tree).is_ok());
    }

    #[test]
    fn a_reference_loop_through_all_of_is_refused() {
        // What crashed the pinned engine with SIGSEGV.
        let looping = json!({"allOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"$ref": "#/$defs/a"}}});
        let message = problem(looping);
        assert!(message.contains("`json_schema`") && message.contains("loop"), "{message}");
        let two_step = json!({"$ref": "#/$defs/a", "$defs": {"a": {"allOf": [{"$ref": "#/$defs/b"}]}, "b": {"$ref": "#/$defs/a"}}});
        assert!(problem(two_step).contains("loop"));
    }

    #[test]
    fn doubling_alternatives_are_refused_by_their_path_count() {
        let mut defs = serde_json::Map::new();
        for i in 0..40 {
            let next = format!("#/$defs/d{}", i + 1);
            defs.insert(format!("d{i}"), json!({"anyOf": [{"$ref": next}, {"$ref": next}]}));
        }
        defs.insert("d40".into(), json!({"type": "string"}));
        let schema = json!({"$ref": "#/$defs/d0", "$defs": defs});
        assert!(problem(schema).contains("10000 paths"));
    }

    #[test]
    fn bounds_of_single_keywords() {
        assert!(problem(json!({"type": ["string", "number", "object", "array", "null"]})).contains("`type` list"));
        let props: serde_json::Map<String, Value> = (0..300).map(|i| (format!("p{i}"), json!({}))).collect();
        assert!(problem(json!({"properties": props})).contains("300 properties"));
        assert!(problem(json!({"type": "array", "maxItems": 100000})).contains("maxItems"));
        assert!(problem(json!({"$ref": "https://example.com/s.json"})).contains("local references"));
        assert!(problem(json!({"$ref": "#/nowhere"})).contains("points nowhere"));
        // Read as `x/y` here, as `x~1y` (itself) by the engine: refused.
        let escaped =
            json!({"allOf": [{"$ref": "#/$defs/x~1y"}], "$defs": {"x/y": {}, "x~1y": {"$ref": "#/$defs/x~1y"}}});
        assert!(problem(escaped).contains("local references"));
        let deep_pattern = format!("^{}$", "(a".repeat(20_000));
        assert!(problem(json!({"type": "string", "pattern": deep_pattern})).contains("`pattern`"));
        assert!(check("json_schema", &json!({"type": "string", "pattern": "^[a-z]+(-[a-z0-9]+)*$"})).is_ok());
        let long_name: serde_json::Map<String, Value> = [("a!".repeat(30_000), json!({}))].into_iter().collect();
        assert!(problem(json!({"properties": long_name, "additionalProperties": true})).contains("property name"));
        assert!(
            check("json_schema", &json!({"type": "array", "maxItems": 2.0})).is_ok(),
            "a whole number written as a float"
        );
        let chain: serde_json::Map<String, Value> = (0..1000)
            .map(|i| (format!("c{i}"), json!({"properties": {"x": {"$ref": format!("#/$defs/c{}", i + 1)}}})))
            .collect();
        assert!(problem(json!({"$ref": "#/$defs/c0", "$defs": chain})).contains("128 levels"));
    }
}
