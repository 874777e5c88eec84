//! Run one input through one fuzz target, outside AFL, to reproduce a crash or a hang:
//!     cargo run -p qnbd-fuzz --example replay -- TARGET FILE...

#[global_allocator]
static ALLOC: qnbd_fuzz::LimitAlloc = qnbd_fuzz::LimitAlloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((name, files)) = args.split_first() else {
        eprintln!("usage: replay TARGET FILE...");
        std::process::exit(2);
    };
    let Some((_, target)) = qnbd_fuzz::TARGETS.iter().find(|(n, _)| n == name) else {
        eprintln!("replay: no target {name}");
        std::process::exit(2);
    };
    for f in files {
        let data = match std::fs::read(f) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("replay: {f}: {e}");
                std::process::exit(2);
            }
        };
        let t = std::time::Instant::now();
        target(&data);
        println!("{f}: {:?}", t.elapsed());
    }
}
