use super::*;
use crate::event::{HttpMethod, HttpRequest};

fn ev(kind: SockEventKind, local: &str, remote: &str, t: i64) -> SockEvent {
    SockEvent {
        kind,
        protocol: Protocol::Tcp,
        local: local.parse().expect("test address"),
        remote: remote.parse().expect("test address"),
        netns_ino: 4026532000,
        cgroup_id: 77,
        pid: 42,
        comm: Comm::new("curl"),
        sock: 1,
        bytes_sent: 0,
        bytes_received: 0,
        packets: 0,
        unix_ms: t,
    }
}

fn agg() -> Aggregator {
    Aggregator::new(AggregatorConfig::default())
}

#[test]
fn connects_to_one_service_fold_into_one_flow() {
    let mut a = agg();
    for (i, port) in [40000u16, 40001, 40002].into_iter().enumerate() {
        a.record(&ev(SockEventKind::Connect, &format!("10.0.0.1:{port}"), "10.0.0.2:80", i as i64));
        a.record(&ev(SockEventKind::Established, &format!("10.0.0.1:{port}"), "10.0.0.2:80", i as i64));
    }
    let flows = a.flush();
    assert_eq!(flows.len(), 1, "{flows:?}");
    let f = &flows[0];
    assert_eq!((f.src_port, f.dst_port, f.connections), (0, 80, 3));
    assert_eq!(f.direction, Direction::Egress);
    assert_eq!((f.first_seen_unix_ms, f.last_seen_unix_ms), (0, 2));
    assert_eq!((f.pid, f.comm.as_str(), f.cgroup_id), (42, "curl", 77));
    assert!(a.flush().is_empty(), "flush empties the interval");
}

#[test]
fn accept_reports_remote_as_source() {
    let mut a = agg();
    a.record(&ev(SockEventKind::Accept, "10.0.0.2:80", "10.0.0.1:40000", 5));
    let f = &a.flush()[0];
    assert_eq!(f.direction, Direction::Ingress);
    assert_eq!(f.src_addr, "10.0.0.1".parse::<IpAddr>().expect("ip"));
    assert_eq!((f.src_port, f.dst_port), (0, 80));
}

#[test]
fn client_ports_are_folded_whatever_their_range() {
    let mut a = agg();
    a.record(&ev(SockEventKind::Connect, "10.0.0.1:123", "10.0.0.2:123", 0));
    a.record(&ev(SockEventKind::Connect, "10.0.0.1:2000", "10.0.0.2:123", 0));
    let flows = a.flush();
    assert_eq!(flows.len(), 1);
    assert_eq!((flows[0].src_port, flows[0].dst_port, flows[0].connections), (0, 123, 2));
}

#[test]
fn close_bytes_go_to_the_connection_flow_even_in_a_later_interval() {
    let mut a = agg();
    a.record(&ev(SockEventKind::Connect, "10.0.0.1:40000", "10.0.0.2:80", 0));
    assert_eq!(a.flush()[0].connections, 1);
    let mut close = ev(SockEventKind::Close, "10.0.0.1:40000", "10.0.0.2:80", 9);
    close.bytes_sent = 100;
    close.bytes_received = 2000;
    a.record(&close);
    let flows = a.flush();
    assert_eq!(flows.len(), 1);
    assert_eq!((flows[0].connections, flows[0].bytes_sent, flows[0].bytes_received), (0, 100, 2000));
    assert_eq!(flows[0].direction, Direction::Egress);
    assert_eq!(a.stats().unattributed, 0);
}

#[test]
fn unknown_close_is_attributed_by_ports_and_counted() {
    let mut a = agg();
    a.record(&ev(SockEventKind::Close, "10.0.0.2:80", "10.0.0.1:50000", 1));
    let f = &a.flush()[0];
    assert_eq!((f.direction, f.dst_port, f.connections), (Direction::Ingress, 80, 0));
    assert_eq!(a.stats().unattributed, 1);
}

#[test]
fn udp_traffic_updates_accumulate_on_first_flow() {
    let mut a = agg();
    let mut first = ev(SockEventKind::Connect, "10.0.0.1:50000", "10.0.0.3:53", 0);
    first.protocol = Protocol::Udp;
    first.bytes_sent = 40;
    first.packets = 1;
    a.record(&first);
    let mut more = SockEvent { kind: SockEventKind::Traffic, bytes_sent: 60, packets: 2, unix_ms: 3, ..first.clone() };
    a.record(&more);
    more.unix_ms = 4;
    a.record(&more);
    let f = &a.flush()[0];
    assert_eq!((f.protocol, f.connections, f.bytes_sent, f.packets), (Protocol::Udp, 1, 160, 5));
    assert_eq!(f.last_seen_unix_ms, 4);
}

#[test]
fn ipv4_mapped_addresses_are_reported_as_ipv4() {
    let mut a = agg();
    a.record(&ev(SockEventKind::Connect, "[::ffff:10.0.0.1]:40000", "[::ffff:10.0.0.2]:80", 0));
    let f = &a.flush()[0];
    assert_eq!(f.dst_addr, "10.0.0.2".parse::<IpAddr>().expect("ip"));
}

#[test]
fn full_interval_drops_and_counts() {
    let mut a = Aggregator::new(AggregatorConfig { max_flows: 2, ..Default::default() });
    for port in [80, 81, 82, 83] {
        a.record(&ev(SockEventKind::Connect, "10.0.0.1:40000", &format!("10.0.0.2:{port}"), 0));
    }
    assert_eq!(a.flush().len(), 2);
    assert_eq!(a.stats().queue_dropped, 2);
}

#[test]
fn open_table_is_bounded() {
    let mut a = Aggregator::new(AggregatorConfig { max_open: 10, ..Default::default() });
    for port in 40000..40100u16 {
        a.record(&ev(SockEventKind::Connect, &format!("10.0.0.1:{port}"), "10.0.0.2:80", 0));
    }
    assert!(a.open.len() <= 10);
    assert_eq!(a.flush()[0].connections, 100);
}

proptest::proptest! {
    /// Whatever the flush points, every connection is counted exactly once.
    #[test]
    fn connections_are_conserved(
        conns in proptest::collection::vec((32768u16..61000, 1u16..5, proptest::bool::ANY), 0..200)
    ) {
        let mut a = agg();
        let mut total = 0;
        for (i, (client, server, flush_after)) in conns.iter().enumerate() {
            let (local, remote) = (format!("10.0.0.1:{client}"), format!("10.0.0.2:{server}"));
            a.record(&ev(SockEventKind::Connect, &local, &remote, i as i64));
            a.record(&ev(SockEventKind::Close, &local, &remote, i as i64));
            if *flush_after {
                total += a.flush().iter().map(|f| f.connections).sum::<u64>();
            }
        }
        total += a.flush().iter().map(|f| f.connections).sum::<u64>();
        proptest::prop_assert_eq!(total, conns.len() as u64);
        proptest::prop_assert_eq!(a.stats().unattributed, 0);
    }
}

// === HTTP ===

fn req(method: HttpMethod, path: &str, local: &str, remote: &str, t: i64) -> HttpRequest {
    HttpRequest {
        netns_ino: 4026532000,
        local: local.parse().expect("test address"),
        remote: remote.parse().expect("test address"),
        cgroup_id: 77,
        method,
        path: path.into(),
        unix_ms: t,
    }
}

/// The server side of one connection as the kernel reports it: Accept (softirq: no
/// pid or comm), then Close with `received` bytes of sequence space.
fn accepted(a: &mut Aggregator, client_port: u16, received: u64, requests: &[(HttpMethod, &str)]) {
    let remote = format!("10.0.0.1:{client_port}");
    let mut accept = ev(SockEventKind::Accept, "10.0.0.2:80", &remote, 1);
    (accept.pid, accept.comm) = (0, Comm::default());
    // Requests first, as the agent feeds them (here: before the Accept, too).
    for (m, p) in requests {
        a.record_http(&req(*m, p, "10.0.0.2:80", &remote, 2));
    }
    a.record(&accept);
    let mut close = SockEvent { kind: SockEventKind::Close, bytes_received: received, ..accept.clone() };
    close.unix_ms = 3;
    a.record(&close);
}

#[test]
fn requests_are_counted_per_method_and_path_on_the_accepted_flow() {
    let mut a = agg();
    accepted(&mut a, 40000, 200, &[(HttpMethod::Post, "/v1/request-landing")]);
    accepted(&mut a, 40001, 200, &[(HttpMethod::Post, "/v1/request-landing"), (HttpMethod::Get, "/health")]);
    let flows = a.flush();
    assert_eq!(flows.len(), 1, "requests land on the accepted connection's flow: {flows:#?}");
    let f = &flows[0];
    assert_eq!((f.direction, f.connections, f.dst_port), (Direction::Ingress, 2, 80));
    let got: Vec<(&str, &str, u64)> =
        f.http.requests.iter().map(|r| (r.method.as_str(), r.path.as_str(), r.requests)).collect();
    assert_eq!(got, vec![("GET", "/health", 1), ("POST", "/v1/request-landing", 2)]);
    assert_eq!((f.http.opaque_connections, f.http.overflow_requests), (0, 0));
}

#[test]
fn payload_without_a_request_line_is_opaque_and_empty_connections_are_not() {
    let mut a = agg();
    accepted(&mut a, 40000, 517, &[]); // a TLS ClientHello
    accepted(&mut a, 40001, 1, &[]); // connect, FIN, nothing else (a TCP probe)
    accepted(&mut a, 40002, 0, &[]); // reset
    accepted(&mut a, 40003, 90, &[(HttpMethod::Get, "/")]);
    let f = &a.flush()[0];
    assert_eq!(f.connections, 4);
    assert_eq!(f.http.opaque_connections, 1, "{:?}", f.http);
    assert_eq!(a.stats().opaque_connections, 1);
    // The client side never counts opaque connections: only the server sees requests.
    let mut a = agg();
    a.record(&ev(SockEventKind::Connect, "10.0.0.1:40000", "10.0.0.2:443", 1));
    a.record(&SockEvent { bytes_received: 5000, ..ev(SockEventKind::Close, "10.0.0.1:40000", "10.0.0.2:443", 2) });
    assert!(a.flush()[0].http.is_empty());
}

#[test]
fn a_connection_with_a_request_in_an_earlier_interval_is_not_opaque() {
    let mut a = agg();
    let remote = "10.0.0.1:40000";
    let mut accept = ev(SockEventKind::Accept, "10.0.0.2:80", remote, 1);
    (accept.pid, accept.comm) = (0, Comm::default());
    a.record(&accept);
    a.record_http(&req(HttpMethod::Get, "/a", "10.0.0.2:80", remote, 2));
    assert_eq!(a.flush()[0].http.requests.len(), 1);
    a.record(&SockEvent { kind: SockEventKind::Close, bytes_received: 300, unix_ms: 9, ..accept });
    let f = &a.flush()[0];
    assert_eq!((f.connections, f.http.opaque_connections), (0, 0), "{f:?}");
}

#[test]
fn a_stale_entry_does_not_lend_its_request_to_a_new_connection() {
    let mut a = agg();
    let remote = "10.0.0.1:40000";
    let mut accept = ev(SockEventKind::Accept, "10.0.0.2:80", remote, 1);
    (accept.pid, accept.comm) = (0, Comm::default());
    a.record(&accept);
    a.record_http(&req(HttpMethod::Get, "/a", "10.0.0.2:80", remote, 2));
    // The Close of that connection was lost; the same tuple is accepted again and
    // carries something else.
    a.record(&accept);
    a.record(&SockEvent { kind: SockEventKind::Close, bytes_received: 300, ..accept });
    assert_eq!(a.flush()[0].http.opaque_connections, 1);
}

#[test]
fn distinct_paths_are_bounded_per_flow_and_per_interval() {
    let mut a = agg();
    for i in 0..(MAX_HTTP_PER_FLOW + 10) {
        a.record_http(&req(HttpMethod::Get, &format!("/item/{i}"), "10.0.0.2:80", "10.0.0.1:40000", 1));
    }
    a.record_http(&req(HttpMethod::Get, "/item/0", "10.0.0.2:80", "10.0.0.1:40000", 1));
    let f = &a.flush()[0];
    assert_eq!(f.http.requests.len(), MAX_HTTP_PER_FLOW);
    assert_eq!(f.http.overflow_requests, 10, "known paths still count, new ones overflow");
    assert_eq!(f.http.total_requests(), MAX_HTTP_PER_FLOW as u64 + 11);

    let mut a = Aggregator::new(AggregatorConfig { max_http_entries: 3, ..Default::default() });
    for (i, port) in [80u16, 81, 82, 83].into_iter().enumerate() {
        a.record_http(&req(HttpMethod::Get, &format!("/{i}"), &format!("10.0.0.2:{port}"), "10.0.0.1:40000", 1));
    }
    let flows = a.flush();
    assert_eq!(flows.iter().map(|f| f.http.requests.len()).sum::<usize>(), 3);
    assert_eq!(flows.iter().map(|f| f.http.overflow_requests).sum::<u64>(), 1);
    assert_eq!(a.stats().http_overflow, 1);
    // The bound is per interval.
    a.record_http(&req(HttpMethod::Get, "/again", "10.0.0.2:83", "10.0.0.1:40000", 1));
    assert_eq!(a.flush()[0].http.requests.len(), 1);
}
