use std::collections::HashMap;
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Token<'a> {
    Ident(&'a str),
    Number(f64),
    Op(char),
}

impl fmt::Display for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Ident(s) => write!(f, "{s}"),
            Token::Number(n) => write!(f, "{n:.3}"),
            Token::Op(c) => write!(f, "'{c}'"),
        }
    }
}

pub fn lex(src: &str) -> Result<Vec<Token<'_>>, String> {
    let mut out = Vec::with_capacity(src.len() / 2);
    let bytes = src.as_bytes();
    let mut i = 0usize;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if c.is_ascii_whitespace() { i += 1; continue; }
        if c.is_ascii_digit() {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') { i += 1; }
            out.push(Token::Number(src[start..i].parse().map_err(|e| format!("{e:?}"))?));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') { i += 1; }
            out.push(Token::Ident(&src[start..i]));
        } else {
            out.push(Token::Op(c));
            i += 1;
        }
    }
    Ok(out)
}

fn main() {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for t in lex("let x_1 = 3.25 * (y + 42);").unwrap() {
        *counts.entry(t.to_string()).or_default() += 1;
    }
    println!("{:?}", counts);
}
