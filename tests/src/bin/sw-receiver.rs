//! The test receiver as a standalone program: `sw-receiver [PORT] [--count]` serves the
//! OAP's trace and management services on 127.0.0.1 and prints one line per thing received
//! (with `--count`: only `segments total=N` whenever the count changes, for benchmarks).

use std::time::Duration;

use observer_tests::receiver::Receiver;

fn main() {
    let port: Option<u16> = std::env::args().nth(1).and_then(|p| p.parse().ok());
    let count_only = std::env::args().any(|a| a == "--count");
    let rx = match port {
        Some(p) => Receiver::start_on(p),
        None => Receiver::start(),
    };
    println!("sw-receiver listening on {}", rx.address());
    let (mut segs, mut props, mut pings) = (0, 0, 0);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if count_only {
            let n = rx.store.segment_count();
            if n != segs {
                println!("segments total={n}");
                segs = n;
            }
            continue;
        }
        let s = rx.store.segments();
        for seg in &s[segs..] {
            let sp = &seg.spans[0];
            println!(
                "segment service={} instance={} trace={} op={} peer={} error={} tags={:?}{}",
                seg.service,
                seg.service_instance,
                seg.trace_id,
                sp.operation_name,
                sp.peer,
                sp.is_error,
                sp.tags.iter().map(|t| format!("{}={}", t.key, t.value)).collect::<Vec<_>>(),
                if sp.logs.is_empty() { "" } else { " +Traceback log" }
            );
            for x in &seg.spans[1..] {
                println!(
                    "  exit span {} parent={} op={} peer={} component={} error={}",
                    x.span_id, x.parent_span_id, x.operation_name, x.peer, x.component_id, x.is_error
                );
            }
        }
        segs = s.len();
        let p = rx.store.properties();
        for pr in &p[props..] {
            println!("properties service={} instance={}", pr.service, pr.service_instance);
        }
        props = p.len();
        let n = rx.store.pings().len();
        if n != pings {
            println!("pings total={n}");
            pings = n;
        }
    }
}
