use super::*;

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
