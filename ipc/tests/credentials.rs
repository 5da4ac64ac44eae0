//! Peer credentials come from the socket: uid, gid and supplementary groups as they were
//! when the peer connected.

use bulkhead_ipc::Channel;

#[test]
fn peer_groups_are_the_peers_supplementary_groups() {
    let (a, _b) = Channel::pair().expect("socketpair");
    let mut want: Vec<u32> = nix::unistd::getgroups()
        .expect("getgroups")
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    let mut got = a.peer_groups().expect("SO_PEERGROUPS");
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want);
    let cred = a.peer_credentials().expect("SO_PEERCRED");
    assert_eq!(cred.uid, nix::unistd::getuid().as_raw());
    assert_eq!(cred.gid, nix::unistd::getgid().as_raw());
}
