//! `adstream-processor`: not built yet; see the open issue for it.

fn main() {
    eprintln!("adstream-processor: not implemented yet");
    std::process::exit(2);
}
