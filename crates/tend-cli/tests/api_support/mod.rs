//! A minimal HTTP/1.1 client for the API tests (plain `std::net::TcpStream`, no client
//! crate): one request per connection, and a reader of Server-Sent Events.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// An answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The `error` of a JSON error answer.
    pub fn error(&self) -> String {
        let v = self.json();
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field in {v}"))
            .to_owned()
    }
}

/// The API of a running device: its address and token.
#[derive(Clone, Debug)]
pub struct Api {
    pub addr: SocketAddr,
    pub token: String,
}

impl Api {
    /// The API a `tend --json run --api ...` start line names, with the home's token.
    pub fn of(home: &Path, info: &serde_json::Value) -> Api {
        let addr = info["api_addr"]
            .as_str()
            .unwrap_or_else(|| panic!("no api_addr in {info}"))
            .parse()
            .expect("an address");
        let token = std::fs::read_to_string(home.join("api.token"))
            .expect("the token file")
            .trim()
            .to_owned();
        Api { addr, token }
    }

    /// A request with the token.
    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        self.call_with(method, path, &[], body)
    }

    /// A request with the token and more headers.
    pub fn call_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let auth = format!("Bearer {}", self.token);
        let mut all = vec![("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        request(self.addr, method, path, &all, body)
    }

    /// Opens the changes feed with the token.
    pub fn changes(&self, path: &str, headers: &[(&str, &str)]) -> Feed {
        let auth = format!("Bearer {}", self.token);
        let mut all = vec![("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        Feed::open(self.addr, path, &all)
    }
}

fn send_head(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).expect("send the head");
    // The server may answer (413, 401) and close before reading a large body.
    let _ = stream.write_all(body);
}

fn read_head(reader: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).expect("a status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("a header line");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').expect("name: value");
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    (status, headers)
}

/// Reads one chunk of a chunked body; `None` at the last chunk.
fn read_chunk(reader: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
        .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
    let mut chunk = vec![0; size];
    reader.read_exact(&mut chunk)?;
    let mut crlf = [0u8; 2];
    reader.read_exact(&mut crlf)?;
    Ok((size > 0).then_some(chunk))
}

/// One request on a new connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect to the API");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a timeout");
    send_head(&mut stream, method, path, headers, body);
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let mut body = Vec::new();
    if method == "HEAD" {
    } else if chunked {
        while let Some(c) = read_chunk(&mut reader).expect("a chunk") {
            body.extend(c);
        }
    } else if let Some(len) = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.resize(len, 0);
        reader.read_exact(&mut body).expect("the body");
    } else {
        reader.read_to_end(&mut body).expect("the body");
    }
    Reply {
        status,
        headers,
        body,
    }
}

/// A Server-Sent Event.
#[derive(Clone, Debug, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }
}

/// An open changes feed; a thread reads the stream and hands over its chunks.
pub struct Feed {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body of an answer that is not a stream (an error).
    pub body: Vec<u8>,
    chunks: Option<Receiver<Vec<u8>>>,
    stream: TcpStream,
    /// Decoded body text not yet split into events.
    text: String,
}

impl Drop for Feed {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl Feed {
    fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Feed {
        let mut stream = TcpStream::connect(addr).expect("connect to the API");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("a timeout");
        let mut all = vec![("Accept", "text/event-stream")];
        all.extend_from_slice(headers);
        send_head(&mut stream, "GET", path, &all, b"");
        let mut reader = BufReader::new(stream.try_clone().expect("a second handle"));
        let (status, headers) = read_head(&mut reader);
        let mut feed = Feed {
            status,
            headers,
            body: Vec::new(),
            chunks: None,
            stream,
            text: String::new(),
        };
        if status != 200 {
            let len = feed
                .headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(0);
            feed.body.resize(len, 0);
            reader.read_exact(&mut feed.body).expect("the body");
            return feed;
        }
        reader.get_ref().set_read_timeout(None).expect("no timeout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            while let Ok(Some(c)) = read_chunk(&mut reader) {
                if tx.send(c).is_err() {
                    break;
                }
            }
        });
        feed.chunks = Some(rx);
        feed
    }

    /// The next event (keep-alive comments skipped), or `None` after `timeout` or when
    /// the stream ends.
    pub fn next_event(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut ev = SseEvent::default();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        ev.id = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        ev.event = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                    }
                }
                if data.is_empty() && ev.id.is_none() && ev.event.is_none() {
                    continue; // a comment (keep-alive)
                }
                ev.data = data.join("\n");
                return Some(ev);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.chunks.as_ref()?.recv_timeout(left) {
                Ok(c) => self
                    .text
                    .push_str(&String::from_utf8(c).expect("UTF-8 events")),
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => {
                    self.chunks = None;
                    return None;
                }
            }
        }
    }

    /// The next `n` events; panics if they do not come within `timeout`.
    pub fn take(&mut self, n: usize, timeout: Duration) -> Vec<SseEvent> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left) {
                Some(e) => out.push(e),
                None => panic!("only {} of {n} events came: {out:?}", out.len()),
            }
        }
        out
    }
}
