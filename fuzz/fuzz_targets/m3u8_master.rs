//! A master playlist from a peer (`streamctl watch` reads a broadcast's, the broadcast page's
//! player reads the same). What parses is rendered again with our writer and must read back the
//! same variants.

#![no_main]

use libfuzzer_sys::fuzz_target;
use streaming_hls::{Variant, parse_master, render_master};

fuzz_target!(|data: &[u8]| {
    // hls_m3u8 panics on some inputs and `parse_master` turns that into an error; libfuzzer-sys's
    // panic hook would abort before the catch. Quiet hook: only a panic that reaches libFuzzer's
    // own wrapper (this target's checks, or one the parser does not catch) is a crash.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = parse_master(text) else {
        return;
    };
    // Our writer names renditions by a URI template and always writes a resolution; compare
    // what it can express.
    let variants: Vec<Variant> = parsed
        .iter()
        .enumerate()
        .filter_map(|(index, v)| {
            let (width, height) = v.resolution?;
            Some(Variant {
                name: index.to_string(),
                bandwidth_bps: v.bandwidth,
                width,
                height,
                fps: 25,
            })
        })
        .collect();
    let rendered = render_master(&variants, |name| format!("{name}/index.m3u8"));
    let again = parse_master(&rendered)
        .unwrap_or_else(|e| panic!("our own master playlist does not parse: {e}\n{rendered}"));
    assert_eq!(again.len(), variants.len(), "{rendered}");
    let mut expected: Vec<(u64, Option<(u32, u32)>)> = variants
        .iter()
        .map(|v| (v.bandwidth_bps, Some((v.width, v.height))))
        .collect();
    let mut got: Vec<(u64, Option<(u32, u32)>)> =
        again.iter().map(|v| (v.bandwidth, v.resolution)).collect();
    expected.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, expected, "{rendered}");
    // Best first, as players pick the first variant to start.
    assert!(again.windows(2).all(|w| w[0].bandwidth >= w[1].bandwidth));
});
