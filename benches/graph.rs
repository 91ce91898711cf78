//! Microsoft Graph rich notifications: decrypting one item's
//! `encryptedContent` with a 2048-bit key, the per-item cost of
//! `includeResourceData` (DESIGN §4, Graph).
//!
//! The RSA-OAEP unwrap of `dataKey` (a blinded private-key operation)
//! dominates; HMAC and AES over a presence resource of about 150 bytes are
//! noise beside it. The forged case changes one byte of `data`: the signature
//! check fails after the unwrap, so a forgery costs as much as a real item.
//! That is why the webhook checks `clientState` first.
//!
//! Run: `cargo bench --bench graph`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use presence_gateway::providers::graph_rich::{DecryptError, RichKey, encrypt_for_tests};
use rand::SeedableRng;
use rand::rngs::StdRng;

#[path = "../tests/common/graph_keys.rs"]
mod graph_keys;

const PRESENCE: &[u8] = br##"{"@odata.type":"#Microsoft.Graph.presence","id":"66825e03-7ef5-42da-9069-724602c31f6b","availability":"Busy","activity":"InACall"}"##;

fn decrypt(c: &mut Criterion) {
    let (cert, key) = graph_keys::generate();
    let rich = RichKey::from_pem(&cert, &key, "bench").expect("matching pair");
    let content =
        encrypt_for_tests(&cert, PRESENCE, &mut StdRng::seed_from_u64(1)).expect("encrypt");
    // The benchmark is meaningless unless the valid item decrypts.
    let plaintext = rich
        .decrypt(&content.data_key, &content.data_signature, &content.data)
        .expect("decrypts");
    assert_eq!(plaintext, PRESENCE);

    let mut forged = content.clone();
    let first = if forged.data.starts_with('A') {
        "B"
    } else {
        "A"
    };
    forged.data.replace_range(..1, first);
    assert_eq!(
        rich.decrypt(&forged.data_key, &forged.data_signature, &forged.data),
        Err(DecryptError::SignatureMismatch)
    );

    let mut group = c.benchmark_group("graph_rich_decrypt_rsa2048");
    group.bench_function("presence", |b| {
        b.iter(|| {
            rich.decrypt(
                black_box(&content.data_key),
                black_box(&content.data_signature),
                black_box(&content.data),
            )
        });
    });
    group.bench_function("forged_data", |b| {
        b.iter(|| {
            rich.decrypt(
                black_box(&forged.data_key),
                black_box(&forged.data_signature),
                black_box(&forged.data),
            )
        });
    });
    group.finish();
}

criterion_group!(benches, decrypt);
criterion_main!(benches);
