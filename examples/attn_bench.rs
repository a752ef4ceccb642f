use anetrain::ops::attention::*;
use anetrain::ops::Par;
use std::time::Instant;
fn main() {
    let dims = AttnDims { b: 1, t: 256, h: 12, kv: 12, d: 64 };
    let n = 256;
    let q: Vec<f32> = (0..n * 768).map(|i| ((i * 7) % 13) as f32 * 0.01).collect();
    let (k, v, dout) = (q.clone(), q.clone(), q.clone());
    let (mut out, mut probs, mut hm) = (vec![0.0; n * 768], vec![0.0; dims.probs_len()], vec![0.0; n * 768]);
    let (mut dq, mut dk, mut dv, mut ds, mut dkh, mut dvh) = (vec![0.0; n * 768], vec![0.0; n * 768], vec![0.0; n * 768], vec![0.0; dims.probs_len()], vec![0.0; n * 768], vec![0.0; n * 768]);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let par = Par { threads: 2, gemm: anetrain::ops::GemmImpl::Gemm };
    pool.install(|| {
        let mut ts = vec![];
        for _ in 0..50 {
            let s = Instant::now();
            attention_forward(par, &mut out, &mut probs, &mut hm, &q, &k, &v, dims);
            let sc = AttnBackwardScratch { ds: &mut ds, dq_hm: &mut hm, dk_hm: &mut dkh, dv_hm: &mut dvh };
            attention_backward(par, &mut dq, &mut dk, &mut dv, sc, &dout, &probs, &q, &k, &v, dims);
            ts.push(s.elapsed().as_secs_f64() * 1e3);
        }
        ts.sort_by(|a, b| a.total_cmp(b));
        println!("attention fwd+bwd per layer: median {:.2} ms, min {:.2}", ts[25], ts[0]);
    });
}
