//! The text form of a graph: one op per line, values renumbered in topological order,
//! attributes in schema order, floats in shortest round-trip form. `parse(print(g))` prints
//! back to the same text.
//!
//! ```text
//! %0 = input "tokens" : i32[T]
//! %3 = rms_norm %1, %2 {eps=1e-5} : f32[T,256]
//! %4, %5 = quant_act %3 : i8[T,256], f32[T]
//! output "logits" %40
//! ```

use crate::graph::{Graph, IrError, Value};
use crate::op::Op;
use crate::types::TensorType;
use std::collections::HashMap;
use std::fmt::Write;

/// Prints a graph.
pub fn print(g: &Graph) -> Result<String, IrError> {
    let mut names: HashMap<Value, usize> = HashMap::new();
    let mut out = String::new();
    for id in g.order()? {
        let node = g.node(id);
        let results: Vec<String> = (0..node.results.len())
            .map(|i| {
                let n = names.len();
                names.insert(
                    Value {
                        node: id,
                        index: i as u32,
                    },
                    n,
                );
                format!("%{n}")
            })
            .collect();
        if !results.is_empty() {
            let _ = write!(out, "{} = ", results.join(", "));
        }
        out.push_str(node.op.name());
        if let Some(label) = node.op.label() {
            let _ = write!(out, " {label:?}");
        }
        let operands: Vec<String> = node
            .operands
            .iter()
            .map(|v| format!("%{}", names[v]))
            .collect();
        if !operands.is_empty() {
            let _ = write!(out, " {}", operands.join(", "));
        }
        let attrs = node.op.attributes();
        if !attrs.is_empty() {
            let attrs: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = write!(out, " {{{}}}", attrs.join(", "));
        }
        if !node.results.is_empty() {
            let tys: Vec<String> = node.results.iter().map(TensorType::to_string).collect();
            let _ = write!(out, " : {}", tys.join(", "));
        }
        out.push('\n');
    }
    Ok(out)
}

/// Parses the text form. Lines that are empty or start with `#` are skipped. The result is not
/// verified; call [`crate::verify::verify`].
pub fn parse(text: &str) -> Result<Graph, IrError> {
    let mut g = Graph::new();
    let mut values: HashMap<String, Value> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |message: String| IrError::Parse {
            line: i + 1,
            message,
        };
        let (lhs, rhs) = match line.split_once(" = ") {
            Some((l, r)) if l.starts_with('%') => (Some(l), r),
            _ => (None, line),
        };
        let (body, types) = match rhs.rsplit_once(" : ") {
            Some((b, t)) => (b, Some(t)),
            None => (rhs, None),
        };
        let results: Vec<TensorType> = match types {
            Some(t) => split_types(t)
                .iter()
                .map(|s| s.parse().map_err(&err))
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let result_names: Vec<&str> = lhs.map(|l| l.split(", ").collect()).unwrap_or_default();
        if result_names.len() != results.len() {
            return Err(err(format!(
                "{} result names but {} types",
                result_names.len(),
                results.len()
            )));
        }
        let (body, attrs) = match body.split_once(" {") {
            Some((b, a)) => {
                let a = a
                    .strip_suffix('}')
                    .ok_or_else(|| err("missing '}'".into()))?;
                let pairs = a
                    .split(", ")
                    .map(|kv| {
                        kv.split_once('=')
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .ok_or_else(|| err(format!("bad attribute '{kv}'")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                (b, pairs)
            }
            None => (body, Vec::new()),
        };
        let (name, mut rest) = body.split_once(' ').unwrap_or((body, ""));
        let mut label = None;
        if rest.starts_with('"') {
            let end = rest[1..]
                .find('"')
                .ok_or_else(|| err("unterminated name".into()))?
                + 1;
            label = Some(rest[1..end].to_string());
            rest = rest[end + 1..].trim_start();
        }
        let operands = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split(", ")
                .map(|o| {
                    values
                        .get(o.trim())
                        .copied()
                        .ok_or_else(|| err(format!("unknown value '{o}'")))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let op = Op::from_parts(name, label, &attrs, &results).map_err(&err)?;
        let vals = g
            .add_node(op, &operands, results)
            .map_err(|e| err(e.to_string()))?;
        for (n, v) in result_names.iter().zip(vals) {
            if values.insert(n.to_string(), v).is_some() {
                return Err(err(format!("value {n} defined twice")));
            }
        }
    }
    Ok(g)
}

/// Splits `f32[T,4], i8[T]` at the commas outside brackets.
fn split_types(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out
}
