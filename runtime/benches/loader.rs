//! The data loader's throughput on the demo data: samples prepared (decoded, tiled, templated,
//! tokenised) and packed per second, with the demo's data.json and worker threads.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mmc_ir::plan::{LossReduction, LrDecayStyle, LrSchedule, ModelFacts, TrainSettings};
use mmc_runtime::data::{DataLoader, DataPosition};
use std::path::Path;

fn settings() -> TrainSettings {
    TrainSettings {
        micro_batch_size: 1,
        seq_length: 256,
        max_tiles: 7,
        grad_accum_steps: 1,
        data_parallel: 1,
        schedule: LrSchedule {
            lr: 1e-3,
            min_lr: 0.0,
            warmup_iters: 0,
            warmup_fraction: None,
            decay_style: LrDecayStyle::Constant,
        },
        loss_reduction: LossReduction::Token,
        seed: 1,
        model: ModelFacts {
            vocab_size: 151936,
            img_context_token_id: Some(151671),
            tile_size: Some(56),
            tokens_per_tile: Some(4),
            template: Some("internvl2_5".into()),
        },
    }
}

fn loader(c: &mut Criterion) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/demo/data.json");
    let mut l = DataLoader::open(&data, &settings(), DataPosition { sample: 0 })
        .expect("the demo data loads");
    let epoch = l.samples_per_epoch();
    let mut g = c.benchmark_group("loader");
    g.sample_size(10);
    g.throughput(Throughput::Elements(epoch));
    g.bench_function("demo epoch (samples/s)", |b| {
        b.iter(|| {
            let start = l.counts().used;
            while l.counts().used - start < epoch {
                l.next_global_batch().expect("the demo data is valid");
            }
        })
    });
    g.finish();
}

criterion_group!(benches, loader);
criterion_main!(benches);
