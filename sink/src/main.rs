//! `adstream-sink`: not built yet; see the open issue for it.

fn main() {
    eprintln!("adstream-sink: not implemented yet");
    std::process::exit(2);
}
