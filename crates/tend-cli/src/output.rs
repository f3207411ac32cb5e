//! Command output: one value, shown as text for people or as JSON for machines.

use std::error::Error;

/// What a command returns: its output, or the error to print as one line.
pub type CmdResult = Result<Output, Box<dyn Error>>;

/// What a command produced: a JSON value and its human rendering.
pub struct Output {
    pub json: serde_json::Value,
    pub human: String,
    /// Bytes to write to stdout exactly as they are instead of `human` (`tend get`).
    pub raw: Option<Vec<u8>>,
}

impl Output {
    pub fn new(json: impl serde::Serialize, human: impl Into<String>) -> Self {
        let json = serde_json::to_value(json).unwrap_or_else(
            |e| serde_json::json!({ "error": format!("cannot render output: {e}") }),
        );
        Self {
            json,
            human: human.into(),
            raw: None,
        }
    }

    /// Output whose text form is `raw`, byte for byte (values need not be UTF-8).
    pub fn raw(json: impl serde::Serialize, raw: Vec<u8>) -> Self {
        Self {
            raw: Some(raw),
            ..Self::new(json, "")
        }
    }
}

/// Prints the output; a closed stdout (`tend ... | head`) is not an error worth a panic.
pub fn print(out: &Output, json: bool) {
    use std::io::Write;
    // A command that printed as it went (`tend run`) has nothing left to say.
    if out.json.is_null() && out.human.is_empty() {
        return;
    }
    if let (Some(raw), false) = (&out.raw, json) {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(raw).and_then(|()| stdout.flush());
        return;
    }
    let text = if json {
        out.json.to_string()
    } else {
        out.human.trim_end().to_string()
    };
    if !text.is_empty() {
        let _ = writeln!(std::io::stdout().lock(), "{text}");
    }
}

/// One line on stderr: the error and its causes, joined by ": " (JSON under `--json`).
pub fn print_error(e: &(dyn Error + 'static), json: bool) {
    let line = tend_node::control::error_line(e).replace('\n', " ");
    if json {
        eprintln!("{}", serde_json::json!({ "error": line }));
    } else {
        eprintln!("error: {line}");
    }
}
