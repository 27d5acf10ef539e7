//! Stage 4: turn a decoded request into a SkyWalking segment, the way the official Python
//! agent would have reported it from inside the worker. Pure functions: no I/O.

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use observer_proto::v3::{
    KeyStringValuePair, Log, RefType, SegmentObject, SegmentReference, SpanLayer, SpanObject, SpanType,
};

use crate::decode::Request;

/// OAP name limits (characters).
pub const SERVICE_MAX: usize = 70;
pub const INSTANCE_MAX: usize = 70;
pub const ENDPOINT_MAX: usize = 150;

pub const COMPONENT_PYTHON: i32 = 7000;
pub const COMPONENT_FLASK: i32 = 7001;
pub const COMPONENT_DJANGO: i32 = 7004;

/// The parent context carried by an incoming `sw8` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sw8 {
    pub sampled: bool,
    pub trace_id: String,
    pub parent_segment_id: String,
    pub parent_span_id: i32,
    pub parent_service: String,
    pub parent_instance: String,
    pub parent_endpoint: String,
    pub address_used_at_peer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Sw8Error {
    #[error("sw8 has {0} fields, expected 8")]
    Fields(usize),
    #[error("sw8 is over 2 KB")]
    TooLong,
    #[error("sw8 sample flag is not 0 or 1")]
    Sample,
    #[error("sw8 field {0} is not valid base64 text")]
    Base64(usize),
    #[error("sw8 parent span id is not an integer")]
    SpanId,
    #[error("sw8 field {0} is empty")]
    Empty(usize),
}

fn b64(field: &str, idx: usize) -> Result<String, Sw8Error> {
    let raw = B64.decode(field.trim()).map_err(|_| Sw8Error::Base64(idx))?;
    String::from_utf8(raw).map_err(|_| Sw8Error::Base64(idx))
}

/// Parses `sample-b64(traceId)-b64(segmentId)-spanId-b64(service)-b64(instance)-b64(endpoint)-b64(address)`.
pub fn parse_sw8(v: &str) -> Result<Sw8, Sw8Error> {
    let v = v.trim();
    if v.len() > 2048 {
        return Err(Sw8Error::TooLong);
    }
    let f: Vec<&str> = v.split('-').collect();
    if f.len() != 8 {
        return Err(Sw8Error::Fields(f.len()));
    }
    let sampled = match f[0] {
        "1" => true,
        "0" => false,
        _ => return Err(Sw8Error::Sample),
    };
    let s = Sw8 {
        sampled,
        trace_id: b64(f[1], 1)?,
        parent_segment_id: b64(f[2], 2)?,
        parent_span_id: f[3].parse().map_err(|_| Sw8Error::SpanId)?,
        parent_service: b64(f[4], 4)?,
        parent_instance: b64(f[5], 5)?,
        parent_endpoint: b64(f[6], 6)?,
        address_used_at_peer: b64(f[7], 7)?,
    };
    for (i, x) in [(1, &s.trace_id), (2, &s.parent_segment_id), (4, &s.parent_service), (5, &s.parent_instance)] {
        if x.is_empty() {
            return Err(Sw8Error::Empty(i));
        }
    }
    Ok(s)
}

/// `sw8-x`: field 1 is the tracing mode; "1" means skip analysis for every span.
pub fn sw8x_skip_analysis(v: &str) -> bool {
    v.split('-').next().map(str::trim) == Some("1")
}

/// Cuts `s` to at most `max` characters (on a char boundary).
pub fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

/// Instance name for a worker, as the Python agent names it under uWSGI:
/// `<base>-master(<mpid>)-child(<wpid>)`, with the base cut to fit the OAP's limit.
pub fn instance_name(base: &str, master: u32, worker: u32) -> String {
    let suffix =
        if master == worker { format!("-master({master})") } else { format!("-master({master})-child({worker})") };
    let room = INSTANCE_MAX.saturating_sub(suffix.len());
    format!("{}{suffix}", cut(base, room))
}

/// 32 lowercase hex characters, unique per call (random 128 bits).
pub fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Span settings that come from flags and the target's environment.
#[derive(Debug, Clone)]
pub struct SpanConfig {
    pub service: String,
    pub instance_base: String,
    pub component: i32,
    /// Statuses at or above this mark the span as an error.
    pub error_status: u16,
}

/// What building a segment noticed (for the summary's counters).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SegmentNotes {
    pub sw8_malformed: bool,
}

/// One Entry span per request, in its own segment; continues the caller's trace when a
/// valid `sw8` came in.
pub fn segment(r: &Request, cfg: &SpanConfig) -> (SegmentObject, SegmentNotes) {
    let mut notes = SegmentNotes::default();
    // A header cut at the capture limit is over the protocol's 2 KB: never parse a part.
    let cut_sw8 = r.truncated.contains(&"sw8");
    if cut_sw8 && r.sw8.is_some() {
        notes.sw8_malformed = true;
    }
    let parent = r.sw8.as_deref().filter(|_| !cut_sw8).and_then(|v| match parse_sw8(v) {
        Ok(p) => Some(p),
        Err(_) => {
            notes.sw8_malformed = true;
            None
        }
    });
    let trace_id = parent.as_ref().map(|p| p.trace_id.clone()).unwrap_or_else(new_id);
    let host = if r.host.is_empty() { "localhost" } else { &r.host };
    let url = format!("http://{host}{}", r.path);
    let refs = parent
        .map(|p| SegmentReference {
            ref_type: RefType::CrossProcess as i32,
            trace_id: p.trace_id,
            parent_trace_segment_id: p.parent_segment_id,
            parent_span_id: p.parent_span_id,
            parent_service: p.parent_service,
            parent_service_instance: p.parent_instance,
            parent_endpoint: p.parent_endpoint,
            network_address_used_at_peer: p.address_used_at_peer,
        })
        .into_iter()
        .collect();
    let tag = |k: &str, v: String| KeyStringValuePair { key: k.into(), value: v };
    let span = SpanObject {
        span_id: 0,
        parent_span_id: -1,
        start_time: (r.start_us / 1000) as i64,
        end_time: (r.end_us / 1000) as i64,
        refs,
        operation_name: cut(&r.path, ENDPOINT_MAX),
        peer: r.client.clone(),
        span_type: SpanType::Entry as i32,
        span_layer: SpanLayer::Http as i32,
        component_id: cfg.component,
        is_error: r.status >= cfg.error_status || r.exception.is_some(),
        tags: vec![
            tag("http.method", r.method.clone()),
            tag("http.url", url),
            tag("http.status_code", r.status.to_string()),
        ],
        // As the Python agent's span.raised(): one log entry, key "Traceback".
        logs: r
            .exception
            .iter()
            .map(|e| Log { time: (r.end_us / 1000) as i64, data: vec![tag("Traceback", e.traceback.clone())] })
            .collect(),
        skip_analysis: r.sw8_x.as_deref().is_some_and(sw8x_skip_analysis),
    };
    let mut spans = vec![span];
    // Exit spans: children of the entry span, in the same segment.
    for (i, c) in r.calls.iter().enumerate() {
        spans.push(SpanObject {
            span_id: i as i32 + 1,
            parent_span_id: 0,
            start_time: (c.start_us / 1000) as i64,
            end_time: (c.end_us / 1000) as i64,
            refs: vec![],
            operation_name: cut(&c.operation, ENDPOINT_MAX),
            peer: c.peer.clone(),
            span_type: SpanType::Exit as i32,
            span_layer: match c.layer {
                "Http" => SpanLayer::Http,
                "Cache" => SpanLayer::Cache,
                "Database" => SpanLayer::Database,
                _ => SpanLayer::Unknown,
            } as i32,
            component_id: c.component,
            is_error: c.is_error,
            tags: c.tags.iter().map(|(k, v)| tag(k, v.clone())).collect(),
            logs: vec![],
            skip_analysis: spans[0].skip_analysis,
        });
    }
    let seg = SegmentObject {
        trace_id,
        trace_segment_id: new_id(),
        spans,
        service: cfg.service.clone(),
        service_instance: instance_name(&cfg.instance_base, r.instance, r.worker_pid),
        is_size_limited: false,
    };
    (seg, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(s: &str) -> String {
        B64.encode(s)
    }

    fn sw8() -> String {
        format!(
            "1-{}-{}-3-{}-{}-{}-{}",
            enc("trace-1"),
            enc("seg-parent"),
            enc("gateway"),
            enc("gw-1"),
            enc("/checkout"),
            enc("10.0.0.1:80")
        )
    }

    fn req() -> Request {
        Request {
            kind: "request",
            instance: 100,
            worker_pid: 101,
            tid: 101,
            core: 0,
            method: "GET".into(),
            path: "/users/42".into(),
            query: "a=1".into(),
            host: "shop:8080".into(),
            status: 200,
            response_bytes: 10,
            start_us: 1_700_000_000_123_456,
            end_us: 1_700_000_000_223_999,
            duration_us: 100_543,
            client: "10.1.1.1:5000".into(),
            sw8: None,
            sw8_correlation: None,
            sw8_x: None,
            truncated: vec![],
            exception: None,
            calls: vec![],
        }
    }

    fn cfg() -> SpanConfig {
        SpanConfig {
            service: "shop".into(),
            instance_base: "host1".into(),
            component: COMPONENT_FLASK,
            error_status: 400,
        }
    }

    #[test]
    fn parses_sw8() {
        let p = parse_sw8(&sw8()).unwrap();
        assert_eq!(p.trace_id, "trace-1");
        assert_eq!(p.parent_segment_id, "seg-parent");
        assert_eq!(p.parent_span_id, 3);
        assert_eq!(p.parent_service, "gateway");
        assert_eq!(p.parent_instance, "gw-1");
        assert_eq!(p.parent_endpoint, "/checkout");
        assert_eq!(p.address_used_at_peer, "10.0.0.1:80");
        assert!(p.sampled);
    }

    #[test]
    fn rejects_malformed_sw8() {
        assert_eq!(parse_sw8(""), Err(Sw8Error::Fields(1)));
        assert_eq!(parse_sw8("1-a-b"), Err(Sw8Error::Fields(3)));
        assert_eq!(parse_sw8(&sw8().replacen('1', "7", 1)), Err(Sw8Error::Sample));
        let bad_b64 = sw8().replacen(&enc("trace-1"), "!!!", 1);
        assert_eq!(parse_sw8(&bad_b64), Err(Sw8Error::Base64(1)));
        let bad_span = sw8().replacen("-3-", "-x-", 1);
        assert_eq!(parse_sw8(&bad_span), Err(Sw8Error::SpanId));
        let empty_trace = format!("1--{}-3-{}-{}-{}-{}", enc("s"), enc("a"), enc("b"), enc("c"), enc("d"));
        assert_eq!(parse_sw8(&empty_trace), Err(Sw8Error::Empty(1)));
        assert_eq!(parse_sw8(&"1-".repeat(2000)), Err(Sw8Error::TooLong));
        // Fuzz-style: no input panics.
        let mut seed = 7u64;
        for _ in 0..2000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = (seed >> 56) as usize;
            let s: String = (0..len).map(|i| b"01-=+/abcXYZ"[((seed >> (i % 60)) as usize) % 12] as char).collect();
            let _ = parse_sw8(&s);
        }
    }

    #[test]
    fn entry_segment_like_the_python_agent() {
        let (seg, notes) = segment(&req(), &cfg());
        assert_eq!(notes, SegmentNotes::default());
        assert_eq!(seg.service, "shop");
        assert_eq!(seg.service_instance, "host1-master(100)-child(101)");
        assert_eq!(seg.trace_id.len(), 32);
        assert_eq!(seg.trace_segment_id.len(), 32);
        assert_ne!(seg.trace_id, seg.trace_segment_id);
        let s = &seg.spans[0];
        assert_eq!((s.span_id, s.parent_span_id), (0, -1));
        assert_eq!((s.start_time, s.end_time), (1_700_000_000_123, 1_700_000_000_223));
        assert_eq!(s.operation_name, "/users/42");
        assert_eq!(s.peer, "10.1.1.1:5000");
        assert_eq!(s.span_type, SpanType::Entry as i32);
        assert_eq!(s.span_layer, SpanLayer::Http as i32);
        assert_eq!(s.component_id, 7001);
        assert!(!s.is_error && !s.skip_analysis && s.refs.is_empty());
        let tags: Vec<(&str, &str)> = s.tags.iter().map(|t| (t.key.as_str(), t.value.as_str())).collect();
        assert_eq!(
            tags,
            vec![("http.method", "GET"), ("http.url", "http://shop:8080/users/42"), ("http.status_code", "200")]
        );
    }

    #[test]
    fn continues_the_callers_trace() {
        let mut r = req();
        r.sw8 = Some(sw8());
        r.sw8_x = Some("1-1700000000000".into());
        r.status = 404;
        let (seg, _) = segment(&r, &cfg());
        assert_eq!(seg.trace_id, "trace-1");
        let s = &seg.spans[0];
        assert!(s.is_error && s.skip_analysis);
        let rf = &s.refs[0];
        assert_eq!(rf.ref_type, RefType::CrossProcess as i32);
        assert_eq!(rf.trace_id, "trace-1");
        assert_eq!(rf.parent_trace_segment_id, "seg-parent");
        assert_eq!(rf.parent_span_id, 3);
        assert_eq!(rf.parent_service, "gateway");
        assert_eq!(rf.parent_service_instance, "gw-1");
        assert_eq!(rf.parent_endpoint, "/checkout");
        assert_eq!(rf.network_address_used_at_peer, "10.0.0.1:80");
    }

    #[test]
    fn truncated_sw8_is_not_parsed() {
        let mut r = req();
        r.sw8 = Some(sw8());
        r.truncated = vec!["sw8"];
        let (seg, notes) = segment(&r, &cfg());
        assert!(notes.sw8_malformed);
        assert!(seg.spans[0].refs.is_empty());
    }

    #[test]
    fn malformed_sw8_starts_a_new_trace() {
        let mut r = req();
        r.sw8 = Some("garbage".into());
        let (seg, notes) = segment(&r, &cfg());
        assert!(notes.sw8_malformed);
        assert!(seg.spans[0].refs.is_empty());
        assert_eq!(seg.trace_id.len(), 32);
    }

    #[test]
    fn names_fit_the_oap_limits() {
        let long = "h".repeat(200);
        let n = instance_name(&long, 4_000_000, 4_000_001);
        assert_eq!(n.chars().count(), INSTANCE_MAX);
        assert!(n.ends_with("-master(4000000)-child(4000001)"));
        assert_eq!(instance_name("h", 5, 5), "h-master(5)");
        let mut r = req();
        r.path = format!("/{}", "é".repeat(300));
        let (seg, _) = segment(&r, &cfg());
        assert_eq!(seg.spans[0].operation_name.chars().count(), ENDPOINT_MAX);
        assert_eq!(cut("abc", 2), "ab");
        assert_eq!(cut("abc", 5), "abc");
    }

    #[test]
    fn error_threshold_is_configurable() {
        let mut r = req();
        r.status = 404;
        let mut c = cfg();
        c.error_status = 500;
        assert!(!segment(&r, &c).0.spans[0].is_error);
        r.status = 503;
        assert!(segment(&r, &c).0.spans[0].is_error);
    }
}
