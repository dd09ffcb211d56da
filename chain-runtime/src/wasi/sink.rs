//! Where the guest's stdout and stderr end up: operator logs, line by line, or a buffer the
//! host reads back.

use super::LOG_LINE_MAX;

/// Where fd 1 or fd 2 output goes.
#[derive(Debug)]
pub enum OutputSink {
    /// Every complete line is emitted with `tracing::info!`. A line longer than
    /// [`LOG_LINE_MAX`] keeps its start and is marked as truncated.
    Log {
        function: String,
        stream: &'static str,
        /// The current, not yet terminated line.
        pending: Vec<u8>,
        /// Bytes of the current line dropped beyond [`LOG_LINE_MAX`].
        dropped: u64,
    },
    /// Output is collected for the host, up to `limit` bytes. Anything beyond that is
    /// discarded and `truncated` is set, so the host can fail the request instead of
    /// returning a silently cut response. The guest is still told its writes succeeded.
    /// Otherwise its behaviour would depend on the host's slot size, and Rust's `write_all`
    /// would turn the short write into a panic with confusing output.
    Capture {
        buf: Vec<u8>,
        limit: usize,
        truncated: bool,
    },
}

impl OutputSink {
    pub fn log(function: &str, stream: &'static str) -> Self {
        OutputSink::Log {
            function: function.to_owned(),
            stream,
            pending: Vec::new(),
            dropped: 0,
        }
    }

    pub fn capture(limit: usize) -> Self {
        OutputSink::Capture {
            buf: Vec::new(),
            limit,
            truncated: false,
        }
    }

    /// True if a `Capture` sink has discarded output beyond its limit.
    pub fn truncated(&self) -> bool {
        matches!(
            self,
            OutputSink::Capture {
                truncated: true,
                ..
            }
        )
    }

    /// How many more bytes this sink will keep. `fd_write` copies no more than this out of
    /// guest memory.
    pub(super) fn room(&self) -> u64 {
        match self {
            OutputSink::Log { .. } => u64::MAX,
            OutputSink::Capture { buf, limit, .. } => limit.saturating_sub(buf.len()) as u64,
        }
    }

    /// Guest output that did not fit in `room()` was dropped.
    pub(super) fn discard(&mut self) {
        if let OutputSink::Capture { truncated, .. } = self {
            *truncated = true;
        }
    }

    pub(super) fn write(&mut self, data: &[u8]) {
        self.write_with(data, &mut log_line);
    }

    /// `emit` is a parameter so that tests can observe lines without a tracing subscriber.
    pub(super) fn write_with(
        &mut self,
        data: &[u8],
        emit: &mut dyn FnMut(&str, &'static str, &str),
    ) {
        match self {
            OutputSink::Log {
                function,
                stream,
                pending,
                dropped,
            } => {
                let mut rest = data;
                while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                    append_capped(pending, dropped, &rest[..nl]);
                    emit_line(function, stream, pending, dropped, emit);
                    rest = &rest[nl + 1..];
                }
                append_capped(pending, dropped, rest);
            }
            OutputSink::Capture {
                buf,
                limit,
                truncated,
            } => {
                let take = data.len().min(limit.saturating_sub(buf.len()));
                buf.extend_from_slice(&data[..take]);
                if take < data.len() {
                    *truncated = true;
                }
            }
        }
    }

    pub(super) fn flush(&mut self) {
        self.flush_with(&mut log_line);
    }

    pub(super) fn flush_with(&mut self, emit: &mut dyn FnMut(&str, &'static str, &str)) {
        if let OutputSink::Log {
            function,
            stream,
            pending,
            dropped,
        } = self
            && (!pending.is_empty() || *dropped > 0)
        {
            emit_line(function, stream, pending, dropped, emit);
        }
    }
}

fn append_capped(pending: &mut Vec<u8>, dropped: &mut u64, data: &[u8]) {
    let keep = data.len().min(LOG_LINE_MAX.saturating_sub(pending.len()));
    pending.extend_from_slice(&data[..keep]);
    *dropped += (data.len() - keep) as u64;
}

fn emit_line(
    function: &str,
    stream: &'static str,
    pending: &mut Vec<u8>,
    dropped: &mut u64,
    emit: &mut dyn FnMut(&str, &'static str, &str),
) {
    // Guests built for Windows consoles end lines with CRLF; the CR is noise in a log.
    let line = pending.strip_suffix(b"\r").unwrap_or(pending);
    let mut text = sanitize(line);
    if *dropped > 0 {
        text.push_str(&format!(" …[{dropped} bytes truncated]"));
    }
    emit(function, stream, &text);
    pending.clear();
    *dropped = 0;
}

/// Guest text goes into operator logs. Escape control characters so a guest can't forge
/// terminal escape sequences or split records. Newlines are already line boundaries here.
fn sanitize(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return text.into_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn log_line(function: &str, stream: &'static str, line: &str) {
    tracing::info!(function = %function, stream, "{line}");
}

pub(super) fn take_captured(sink: &mut OutputSink) -> Vec<u8> {
    match sink {
        OutputSink::Capture { buf, .. } => std::mem::take(buf),
        OutputSink::Log { .. } => Vec::new(),
    }
}
