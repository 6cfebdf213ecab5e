//! HTTP/1.x request lines from the segment starts the kernel copies (ingress TCP
//! segments whose first four bytes look like a method, at most `HTTP_PAYLOAD_MAX`
//! bytes of them).
//!
//! The parse is strict because what it yields becomes policy: a path the learner
//! proposes is a path the enforcer will compare byte for byte. A line is accepted only
//! as `METHOD SP origin-form-target SP HTTP/1.<digit> CRLF` with one of the seven
//! methods the kernel copies; the path is the target up to the first `?` and must be a
//! valid rule path (≤ 128 bytes of visible ASCII). Everything else — other protocols
//! that happen to start with `GET `, absolute-form or `*` targets, HTTP/2 prefaces,
//! bare LF line ends, a path too long for a rule — is refused with a reason, and the
//! caller counts it: the connection then carries no request and, if it carried
//! payload, is *opaque*, which keeps its edge at L4.
//!
//! One allowance: when the copy ends inside the query string (a long query), the
//! version is not in the copy. The method and path are then complete and certain —
//! the `?` ended the path — so the request is accepted; the version is what could
//! not be checked.
//!
//! Input is hostile by definition (any client can send anything): every path returns
//! an error rather than panicking (property-tested below).

use bulkhead_abi::collector::HTTP_PAYLOAD_MAX;
use bulkhead_model::policy::validate_path;

use crate::event::HttpMethod;

/// Why a copied segment start is not a request line we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpParseError {
    #[error("not one of the HTTP methods followed by a space")]
    Method,
    #[error("the request target is not a path starting with '/'")]
    Target,
    #[error("the path is not a valid rule path (too long, or bytes other than visible ASCII)")]
    Path,
    #[error("the request line does not end in ' HTTP/1.x' CRLF")]
    Version,
    #[error("the request line is cut off before its path ends")]
    Truncated,
}

/// A parsed request line: method and path (borrowed from the payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLine<'a> {
    pub method: HttpMethod,
    pub path: &'a str,
}

/// Parses the request line at the start of `payload`. `truncated` says the kernel
/// copied the first [`HTTP_PAYLOAD_MAX`] bytes of a longer segment.
pub fn parse_request_line(payload: &[u8]) -> Result<RequestLine<'_>, HttpParseError> {
    let truncated = payload.len() >= HTTP_PAYLOAD_MAX;
    let sp = payload.iter().take(8).position(|&b| b == b' ').ok_or(HttpParseError::Method)?;
    let method = HttpMethod::from_token(&payload[..sp]).ok_or(HttpParseError::Method)?;
    let rest = &payload[sp + 1..];
    if rest.first() != Some(&b'/') {
        return Err(HttpParseError::Target);
    }
    // The target ends at the next space; the path at the first '?' before it.
    let target_end = rest.iter().position(|&b| b == b' ');
    let path_end = rest[..target_end.unwrap_or(rest.len())].iter().position(|&b| b == b'?');
    let path_bytes = match (path_end, target_end) {
        (Some(q), _) => &rest[..q],
        (None, Some(t)) => &rest[..t],
        (None, None) => return Err(if truncated { HttpParseError::Truncated } else { HttpParseError::Version }),
    };
    let path = std::str::from_utf8(path_bytes).map_err(|_| HttpParseError::Path)?;
    validate_path(path).map_err(|_| HttpParseError::Path)?;
    match target_end {
        Some(t) => {
            let version = &rest[t + 1..];
            // A copy that ends inside the version can only check the part it has.
            let complete = version.len() >= VERSION.len();
            if !(complete || truncated) || !version_matches(version) {
                return Err(HttpParseError::Version);
            }
        }
        // The copy ended inside the query string: see the module doc.
        None if truncated => {}
        None => return Err(HttpParseError::Version),
    }
    Ok(RequestLine { method, path })
}

/// ` HTTP/1.x` CRLF after the target; `#` stands for one digit.
const VERSION: &[u8; 10] = b"HTTP/1.#\r\n";

/// Whether `v` starts with [`VERSION`] (or is a prefix of it, when shorter).
fn version_matches(v: &[u8]) -> bool {
    v.iter().zip(VERSION).all(|(&b, &want)| if want == b'#' { b.is_ascii_digit() } else { b == want })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ok(line: &[u8]) -> (HttpMethod, String) {
        let r = parse_request_line(line).unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(line)));
        (r.method, r.path.to_owned())
    }

    #[test]
    fn accepts_http1_request_lines() {
        assert_eq!(
            ok(b"POST /v1/request-landing HTTP/1.1\r\nHost: deathstar\r\n\r\n"),
            (HttpMethod::Post, "/v1/request-landing".into())
        );
        assert_eq!(ok(b"PUT /v1/exhaust-port HTTP/1.0\r\n"), (HttpMethod::Put, "/v1/exhaust-port".into()));
        assert_eq!(ok(b"GET /search?q=a+b&x=%20 HTTP/1.1\r\n"), (HttpMethod::Get, "/search".into()));
        assert_eq!(ok(b"OPTIONS / HTTP/1.1\r\n"), (HttpMethod::Options, "/".into()));
        assert_eq!(ok(b"DELETE /a/b/c HTTP/1.1\r\n"), (HttpMethod::Delete, "/a/b/c".into()));
        assert_eq!(ok(b"GET /%7Euser/x;y HTTP/1.1\r\n"), (HttpMethod::Get, "/%7Euser/x;y".into()), "no decoding");
    }

    #[test]
    fn a_long_query_cut_by_the_copy_still_names_the_path() {
        let mut line = b"GET /items?filter=".to_vec();
        line.resize(HTTP_PAYLOAD_MAX, b'x');
        assert_eq!(ok(&line), (HttpMethod::Get, "/items".into()));
        // Cut inside the version, after a complete target: accepted too.
        let mut line = b"GET /p?".to_vec();
        line.resize(HTTP_PAYLOAD_MAX - 9, b'q');
        line.extend_from_slice(b" HTTP/1.1");
        assert_eq!(ok(&line), (HttpMethod::Get, "/p".into()));
        line.truncate(HTTP_PAYLOAD_MAX - 4);
        line.extend_from_slice(b"/2.0");
        assert_eq!(parse_request_line(&line), Err(HttpParseError::Version), "a cut HTTP/2 is still refused");
        // Cut inside the path: refused, the path is unknown.
        let mut line = b"GET /".to_vec();
        line.resize(HTTP_PAYLOAD_MAX, b'a');
        assert_eq!(parse_request_line(&line), Err(HttpParseError::Truncated));
    }

    #[test]
    fn refuses_everything_else() {
        let cases: [(&[u8], HttpParseError); 13] = [
            (b"GETX / HTTP/1.1\r\n", HttpParseError::Method),
            (b"get / HTTP/1.1\r\n", HttpParseError::Method),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", HttpParseError::Method),
            (b"CONNECT host:443 HTTP/1.1\r\n", HttpParseError::Method),
            (b"OPTIONS * HTTP/1.1\r\n", HttpParseError::Target),
            (b"GET http://x/ HTTP/1.1\r\n", HttpParseError::Target),
            (b"GET  / HTTP/1.1\r\n", HttpParseError::Target),
            (b"GET / HTTP/2\r\n", HttpParseError::Version),
            (b"GET / HTTP/1.1\n", HttpParseError::Version),
            (b"GET / HTTP/1.1", HttpParseError::Version),
            (b"GET /a\x01b HTTP/1.1\r\n", HttpParseError::Path),
            (b"GET /caf\xc3\xa9 HTTP/1.1\r\n", HttpParseError::Path),
            (b"GET /x", HttpParseError::Version),
        ];
        for (line, want) in cases {
            assert_eq!(parse_request_line(line), Err(want), "{:?}", String::from_utf8_lossy(line));
        }
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(128));
        assert_eq!(parse_request_line(long.as_bytes()), Err(HttpParseError::Path), "129-byte path");
    }

    proptest! {
        #[test]
        fn never_panics_and_only_yields_valid_paths(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(r) = parse_request_line(&bytes) {
                prop_assert!(validate_path(r.path).is_ok());
            }
        }

        #[test]
        fn every_valid_line_parses(
            m in 0usize..7,
            path in "/[!-~&&[^?#]]{0,100}",
            query in proptest::option::of("[a-z=&]{0,20}"),
            minor in 0u8..=1,
        ) {
            let method = HttpMethod::ALL[m];
            let target = match &query { Some(q) => format!("{path}?{q}"), None => path.clone() };
            let line = format!("{method} {target} HTTP/1.{minor}\r\nHost: x\r\n\r\n");
            let r = parse_request_line(line.as_bytes()).expect("valid line");
            prop_assert_eq!(r.method, method);
            prop_assert_eq!(r.path, path.as_str());
        }
    }
}
