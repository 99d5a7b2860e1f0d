use crate::graph::{Graph, Stage, Value};
use crate::op::{Attr, Attrs, Op};
use crate::{DType, TensorType};
use std::collections::HashMap;

/// A syntax error in graph text, with its 1-based line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Val(usize),
    Word(String),
    Str(String),
    Num(f64, bool),
    Punct(char),
}

fn lex(line: &str) -> Result<Vec<Tok>, String> {
    let mut toks = Vec::new();
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == ';' {
            break;
        } else if c == '%' {
            let start = i + 1;
            i = start;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let digits: String = chars[start..i].iter().collect();
            let n = digits
                .parse()
                .map_err(|_| "expected a value number after `%`".to_string())?;
            toks.push(Tok::Val(n));
        } else if c == '"' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("unterminated string".into()),
                    Some('"') => break,
                    Some('\\') => {
                        match chars.get(i + 1) {
                            Some('n') => s.push('\n'),
                            Some(&e @ ('"' | '\\')) => s.push(e),
                            _ => return Err("unknown escape in string".into()),
                        }
                        i += 1;
                    }
                    Some(&c) => s.push(c),
                }
                i += 1;
            }
            i += 1;
            toks.push(Tok::Str(s));
        } else if "=,:[]{}".contains(c) {
            toks.push(Tok::Punct(c));
            i += 1;
        } else if c.is_ascii_digit() || c == '-' || c == '+' {
            let start = i;
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || ".+-".contains(chars[i]))
            {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            let is_int = text
                .trim_start_matches(['-', '+'])
                .chars()
                .all(|c| c.is_ascii_digit());
            let n: f64 = text.parse().map_err(|_| format!("bad number `{text}`"))?;
            toks.push(Tok::Num(n, is_int));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_.".contains(chars[i])) {
                i += 1;
            }
            toks.push(Tok::Word(chars[start..i].iter().collect()));
        } else {
            return Err(format!("unexpected character `{c}`"));
        }
    }
    Ok(toks)
}

struct Cursor {
    toks: Vec<Tok>,
    pos: usize,
}

impl Cursor {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Punct(c)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected `{c}`"))
        }
    }

    fn done(&self) -> bool {
        self.pos >= self.toks.len()
    }

    fn ty(&mut self) -> Result<TensorType, String> {
        let dtype: DType = match self.next() {
            Some(Tok::Word(w)) => w.parse().map_err(|e: crate::UnknownDType| e.to_string())?,
            _ => return Err("expected a type such as f32[2, 3]".into()),
        };
        self.expect('[')?;
        let mut shape = Vec::new();
        if !self.eat(']') {
            loop {
                match self.next() {
                    Some(Tok::Num(n, true)) if n >= 0.0 => shape.push(n as usize),
                    _ => return Err("expected a dimension size".into()),
                }
                if self.eat(']') {
                    break;
                }
                self.expect(',')?;
            }
        }
        let t = TensorType::new(dtype, shape);
        if t.checked_size_bytes().is_none() {
            return Err(format!("{t} is too large: its size in bytes overflows"));
        }
        Ok(t)
    }

    fn attr_value(&mut self) -> Result<Attr, String> {
        match self.next() {
            Some(Tok::Num(n, true)) => Ok(Attr::Int(n as i64)),
            Some(Tok::Num(n, false)) => Ok(Attr::Float(n)),
            Some(Tok::Str(s)) => Ok(Attr::Str(s)),
            Some(Tok::Word(w)) if w == "true" => Ok(Attr::Bool(true)),
            Some(Tok::Word(w)) if w == "false" => Ok(Attr::Bool(false)),
            Some(Tok::Word(w)) if matches!(w.as_str(), "inf" | "nan") => {
                Ok(Attr::Float(w.parse().map_err(|_| "bad number")?))
            }
            Some(Tok::Punct('[')) => {
                let mut items = Vec::new();
                if !self.eat(']') {
                    loop {
                        match self.next() {
                            Some(Tok::Num(n, true)) => items.push(n as i64),
                            _ => return Err("expected an integer in the list".into()),
                        }
                        if self.eat(']') {
                            break;
                        }
                        self.expect(',')?;
                    }
                }
                Ok(Attr::Ints(items))
            }
            _ => Err("expected an attribute value".into()),
        }
    }
}

/// Parses graph text (as written by [`print`](super::print)) into a graph. The result is not
/// verified: run the verifier on it to check types and SSA.
pub fn parse(text: &str) -> Result<Graph, ParseError> {
    let mut graph: Option<Graph> = None;
    let mut values: HashMap<usize, Value> = HashMap::new();
    let mut scope = Default::default();
    let mut closed = false;
    let mut last_line = 0;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        last_line = line;
        let err = |message: String| ParseError { line, message };
        let toks = lex(raw).map_err(err)?;
        if toks.is_empty() {
            continue;
        }
        if closed {
            return Err(err("text after the closing `}`".into()));
        }
        let mut c = Cursor { toks, pos: 0 };
        let Some(g) = graph.as_mut() else {
            let stage = match (c.next(), c.next(), c.next()) {
                (Some(Tok::Word(kw)), Some(Tok::Word(stage)), Some(Tok::Punct('{')))
                    if kw == "graph" && c.done() =>
                {
                    stage.parse::<Stage>().map_err(err)?
                }
                _ => return Err(err("expected `graph <stage> {`".into())),
            };
            graph = Some(Graph::new(stage));
            continue;
        };
        match c.next() {
            Some(Tok::Punct('}')) if c.done() => closed = true,
            Some(Tok::Word(w)) if w == "scope" => match (c.next(), c.done()) {
                (Some(Tok::Str(s)), true) => scope = g.intern_scope(&s),
                _ => return Err(err("expected `scope \"name\"`".into())),
            },
            Some(Tok::Word(w)) if w == "output" => {
                let (Some(Tok::Str(name)), true, Some(Tok::Val(n)), true) =
                    (c.next(), c.eat('='), c.next(), c.done())
                else {
                    return Err(err("expected `output \"name\" = %N`".into()));
                };
                let v = *values
                    .get(&n)
                    .ok_or_else(|| err(format!("%{n} is not defined")))?;
                g.add_output(name, v);
            }
            Some(Tok::Val(first)) => {
                let mut results = vec![first];
                while c.eat(',') {
                    match c.next() {
                        Some(Tok::Val(n)) => results.push(n),
                        _ => return Err(err("expected a result value".into())),
                    }
                }
                c.expect('=').map_err(err)?;
                let name = match c.next() {
                    Some(Tok::Word(w)) => w,
                    _ => return Err(err("expected an op name".into())),
                };
                let label = match c.peek() {
                    Some(Tok::Str(s)) => {
                        let s = s.clone();
                        c.next();
                        Some(s)
                    }
                    _ => None,
                };
                let mut operands = Vec::new();
                if let Some(Tok::Val(_)) = c.peek() {
                    loop {
                        match c.next() {
                            Some(Tok::Val(n)) => operands.push(
                                *values
                                    .get(&n)
                                    .ok_or_else(|| err(format!("%{n} is not defined")))?,
                            ),
                            _ => return Err(err("expected an operand".into())),
                        }
                        if !c.eat(',') {
                            break;
                        }
                    }
                }
                let mut attrs = Attrs::default();
                while let Some(Tok::Word(_)) = c.peek() {
                    let Some(Tok::Word(key)) = c.next() else {
                        unreachable!("peeked a word")
                    };
                    c.expect('=').map_err(err)?;
                    let value = c.attr_value().map_err(err)?;
                    attrs.0.push((key, value));
                }
                c.expect(':').map_err(err)?;
                let mut types = vec![c.ty().map_err(err)?];
                while c.eat(',') {
                    types.push(c.ty().map_err(err)?);
                }
                if !c.done() {
                    return Err(err("unexpected text at the end of the line".into()));
                }
                if types.len() != results.len() {
                    return Err(err(format!(
                        "{} result(s) but {} type(s)",
                        results.len(),
                        types.len()
                    )));
                }
                let op = Op::from_parts(&name, label, &attrs, &types).map_err(err)?;
                let id = g.push_node_unchecked(op, &operands, types, scope);
                for (n, &v) in results.iter().zip(&g.node(id).outputs.clone()) {
                    if values.insert(*n, v).is_some() {
                        return Err(err(format!("%{n} is defined twice")));
                    }
                }
            }
            _ => return Err(err("expected a node, `scope`, `output` or `}`".into())),
        }
    }
    match graph {
        Some(g) if closed => Ok(g),
        _ => Err(ParseError {
            line: last_line.max(1),
            message: "the graph is not closed with `}`".into(),
        }),
    }
}
