//! A device backend that never answers, for tests of how Bulkhead copes with one: it says
//! it is ready (one byte on `--ready-fd N`, as Bulkhead's backends do) and then holds its
//! vhost-user socket without ever reading it, until it is killed.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ready = args
        .iter()
        .position(|a| a == "--ready-fd")
        .and_then(|i| args.get(i + 1));
    if let Some(fd) = ready.and_then(|v| v.parse::<i32>().ok()) {
        // SAFETY: bulkheadd hands this process the ready pipe as fd `fd`, for it to write
        // one byte to and own; nothing else here uses that fd.
        let mut pipe = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let _ = std::io::Write::write_all(&mut pipe, &[1]);
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
