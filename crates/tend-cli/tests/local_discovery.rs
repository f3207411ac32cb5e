//! End-to-end: `tend run --local-discovery 127.0.0.1` devices that were given no peer and
//! no rendezvous find each other by multicast on the loopback interface and converge.

mod common;

use common::*;

#[test]
fn devices_given_no_peer_find_each_other_on_the_local_network() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_device_authority(dir.path());
    // A port of our own, so parallel tests never share the group.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let group = format!("239.255.77.77:{port}");
    let run_args = [
        "--listen",
        "127.0.0.1:0",
        "--sync-interval",
        "0.3",
        "--local-discovery",
        "127.0.0.1",
        "--local-group",
        &group,
    ];
    discover_each_other_and_converge(&a, &b, &run_args);
}

#[test]
fn a_group_that_is_not_multicast_is_one_line_of_error() {
    let dir = tempfile::tempdir().unwrap();
    ok_json(dir.path(), &["init"]);
    let err = fails_in_one_line(
        dir.path(),
        &[
            "run",
            "--local-discovery",
            "127.0.0.1",
            "--local-group",
            "127.0.0.1:47177",
        ],
    );
    assert!(err.contains("multicast"), "{err}");
    // The group option alone means nothing: it is refused, not ignored.
    let err = fails(dir.path(), &["run", "--local-group", "239.255.77.77:1"]);
    assert!(err.contains("--local-discovery"), "{err}");
}
