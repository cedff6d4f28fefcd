//! The text form parses back to a graph that prints identically, for random valid graphs; the
//! parser and the verifier say what is wrong and where.

use bitnetc_ir::op::Op;
use bitnetc_ir::text::{parse, print};
use bitnetc_ir::types::HalfPath;
use bitnetc_ir::verify::verify;
use bitnetc_ir::{Activation, DType, Dim, Encoding, Graph, RopeStyle, TensorType, Value};
use proptest::prelude::*;

/// One random building step; combinations the ops do not accept are skipped.
#[derive(Clone, Debug)]
enum Step {
    Norm(usize, f32),
    Linear(usize, usize, u64),
    Act(usize, bool),
    Add(usize, usize),
    Mul(usize, usize),
    Attention(usize, f32, usize, usize, u32),
}

/// A float in `[lo, hi)` drawn from a 24-bit integer: proptest 1.12's own `f32` range sampler
/// can trip its internal assertion `self.low - result < initial.step` on some seeds.
fn float_in(lo: f32, hi: f32) -> impl Strategy<Value = f32> {
    (0u32..1 << 24)
        .prop_map(move |k| (lo + (hi - lo) * (k as f32 / (1u32 << 24) as f32)).min(hi.next_down()))
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (any::<usize>(), float_in(1e-7, 1e-3)).prop_map(|(a, e)| Step::Norm(a, e)),
        (any::<usize>(), 0usize..9, 1u64..4).prop_map(|(a, e, n)| Step::Linear(a, e, n * 32)),
        (any::<usize>(), any::<bool>()).prop_map(|(a, s)| Step::Act(a, s)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Step::Add(a, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Step::Mul(a, b)),
        (
            any::<usize>(),
            float_in(0.01, 1.0),
            0usize..4,
            0usize..4,
            1u32..1_000_000
        )
            .prop_map(|(a, s, p, q, t)| Step::Attention(a, s, p, q, t)),
    ]
}

fn build(steps: &[Step]) -> Graph {
    let mut g = Graph::new();
    let tokens = g.input("tokens", TensorType::new(DType::I32, vec![Dim::T]));
    let positions = g.input("positions", TensorType::new(DType::I32, vec![Dim::T]));
    let table = g.weight(
        "embd",
        TensorType::new(DType::F16, vec![Dim::Fixed(100), Dim::Fixed(64)]),
    );
    let x = g.add1(Op::Embed, &[tokens, table]).unwrap();
    let mut values: Vec<Value> = vec![x];
    let mut n_weights = 0;
    let mut layer = 0;
    let mut weight = |g: &mut Graph, dtype: DType, shape: Vec<u64>| {
        n_weights += 1;
        let shape: Vec<Dim> = shape.into_iter().map(Dim::Fixed).collect();
        g.weight(
            &format!("w{n_weights}.weight"),
            TensorType::new(dtype, shape),
        )
    };
    for s in steps {
        let pick = |i: &usize| values[i % values.len()];
        let width = |g: &Graph, v: Value| g.ty(v).shape[1].fixed().unwrap();
        let new = match s {
            Step::Norm(a, eps) => {
                let x = pick(a);
                let n = width(&g, x);
                let w = weight(&mut g, DType::F32, vec![n]);
                g.add1(Op::RmsNorm { eps: *eps }, &[x, w]).ok()
            }
            Step::Linear(a, e, n) => {
                let x = pick(a);
                let k = width(&g, x);
                let enc = Encoding::ALL[*e];
                if k % enc.block_elems() as u64 != 0 {
                    None
                } else if enc == Encoding::I2S {
                    let w = weight(&mut g, DType::of_encoding(enc), vec![*n, k]);
                    let qs = g.add(Op::QuantAct, &[x]).unwrap();
                    g.add1(Op::TMatmul, &[qs[0], qs[1], w]).ok()
                } else {
                    let w = weight(&mut g, DType::of_encoding(enc), vec![*n, k]);
                    let half = match enc {
                        Encoding::F16 | Encoding::BF16 => HalfPath::ALL[*e % 4],
                        _ => HalfPath::F32,
                    };
                    g.add1(Op::Matmul { half }, &[x, w]).ok()
                }
            }
            Step::Act(a, silu) => {
                let act = if *silu {
                    Activation::Silu
                } else {
                    Activation::Relu2
                };
                g.add1(Op::Act { act }, &[pick(a)]).ok()
            }
            Step::Add(a, b) => g.add1(Op::Add, &[pick(a), pick(b)]).ok(),
            Step::Mul(a, b) => g.add1(Op::Mul, &[pick(a), pick(b)]).ok(),
            Step::Attention(a, scale, kq, kqv, theta) => {
                let x = pick(a);
                let w = width(&g, x);
                if w % 64 != 0 {
                    None
                } else {
                    let heads = Dim::Fixed(w / 32);
                    let q = g
                        .add1(
                            Op::Reshape {
                                shape: vec![Dim::T, heads, Dim::Fixed(32)],
                            },
                            &[x],
                        )
                        .unwrap();
                    let rope = Op::Rope {
                        theta: *theta as f32,
                        // Both RoPE styles and both cache types, by the parity of theta.
                        style: if theta % 2 == 0 {
                            RopeStyle::Neox
                        } else {
                            RopeStyle::Norm
                        },
                        dims: 32,
                    };
                    let q = g.add1(rope, &[q, positions]).unwrap();
                    let kv = g
                        .add(
                            Op::KvAppend {
                                layer,
                                cache: if theta % 2 == 0 {
                                    DType::F16
                                } else {
                                    DType::F32
                                },
                            },
                            &[q, q],
                        )
                        .unwrap();
                    layer += 1;
                    let (kq, kqv) = (HalfPath::ALL[*kq], HalfPath::ALL[*kqv]);
                    let a = g
                        .add1(
                            Op::Attention {
                                scale: *scale,
                                kq,
                                kqv,
                            },
                            &[q, kv[0], kv[1]],
                        )
                        .unwrap();
                    g.add1(
                        Op::Reshape {
                            shape: vec![Dim::T, Dim::Fixed(w)],
                        },
                        &[a],
                    )
                    .ok()
                }
            }
        };
        values.extend(new);
    }
    let last = *values.last().unwrap();
    g.output("logits", last).unwrap();
    g
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn print_parse_print_is_identity(steps in proptest::collection::vec(step(), 0..40)) {
        let g = build(&steps);
        verify(&g).unwrap();
        let text = print(&g).unwrap();
        let parsed = parse(&text).unwrap();
        verify(&parsed).unwrap();
        prop_assert_eq!(print(&parsed).unwrap(), text);
    }
}

#[test]
fn parse_errors_name_the_line() {
    let bad = [
        (
            "%0 = input \"tokens\" : i32[T]\n%1 = embed %0, %9 : f32[T,4]",
            "line 2: unknown value '%9'",
        ),
        (
            "%0 = frobnicate : f32[T]",
            "line 1: unknown op 'frobnicate'",
        ),
        (
            "%0 = input \"tokens\" : i32[Q]",
            "line 1: bad dimension 'Q'",
        ),
        (
            "%0 = rms_norm : f32[T,4]",
            "line 1: rms_norm: missing attribute 'eps'",
        ),
        (
            "%0 = input \"tokens\" {x=1} : i32[T]",
            "line 1: input: unknown attribute 'x'",
        ),
        (
            "%0, %1 = input \"tokens\" : i32[T]",
            "line 1: 2 result names but 1 types",
        ),
    ];
    for (text, expected) in bad {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.starts_with(expected), "{err}");
    }
}

#[test]
fn verifier_rejects_wrong_types() {
    // Parsing keeps the declared types; the verifier checks them against the op's rule.
    let text = "%0 = input \"tokens\" : i32[T]\n%1 = weight \"e\" : f16[10,4]\n%2 = embed %0, %1 : f32[T,5]\noutput \"logits\" %2\n";
    let err = verify(&parse(text).unwrap()).unwrap_err().to_string();
    assert_eq!(
        err,
        "embed: results are [f32[T,5]], the op gives [f32[T,4]]"
    );
    let text = "%0 = input \"tokens\" : i32[T]\n%1 = input \"tokens\" : i32[T]\n";
    assert_eq!(
        verify(&parse(text).unwrap()).unwrap_err().to_string(),
        "input \"tokens\": declared twice"
    );
    let text = "%0 = weight \"w\" : q8_0[4,32]\n%1 = input \"tokens\" : i32[T]\n%2 = embed %1, %0 : f32[T,32]\n%3 = matmul %2, %0 {half=gemv} : f32[T,4]\n";
    let err = verify(&parse(text).unwrap()).unwrap_err().to_string();
    assert!(
        err.contains("the half path applies to f16/bf16 weights only"),
        "{err}"
    );
}

/// One broken rule per op: each graph parses (the text keeps declared types) and the verifier
/// names the op and what it expected.
#[test]
fn verifier_names_each_ops_rule() {
    const HEAD: &str = "%0 = input \"tokens\" : i32[T]\n%1 = input \"positions\" : i32[T]\n\
                        %2 = weight \"e\" : f16[16,64]\n%3 = embed %0, %2 : f32[T,64]\n";
    let cases: [(&str, &str); 10] = [
        (
            "%4 = weight \"g\" : f32[32]\n%5 = rms_norm %3, %4 {eps=1e-5} : f32[T,64]\n",
            "rms_norm: gain must be float[N] with N the last dim of x",
        ),
        (
            "%4 = weight \"w\" : i2_s[32,48]\n%5, %6 = quant_act %3 : i8[T,64], f32[T]\n\
             %7 = tmatmul %5, %6, %4 : f32[T,32]\n",
            "tmatmul: w must be [N,K] with q's K",
        ),
        (
            "%4 = weight \"w\" : f16[32,48]\n%5 = matmul %3, %4 {half=gemv} : f32[T,32]\n",
            "matmul: w must be [N,K] with x's K",
        ),
        (
            "%4 = reshape %3 : f32[T,2,32]\n\
             %5 = rope %4, %1 {theta=10000.0, style=norm, dims=64} : f32[T,2,32]\n",
            "rope: dims must be even and at most the head size",
        ),
        (
            "%4 = reshape %3 : f32[T,2,32]\n%5 = reshape %3 : f32[T,4,16]\n\
             %6, %7 = kv_append %4, %5 {layer=0, cache=f16} : f16[P+T,2,32], f16[P+T,2,32]\n",
            "kv_append: v must have k's type",
        ),
        (
            "%4 = reshape %3 : f32[T,3,21]\n",
            "reshape: the element count must not change",
        ),
        (
            "%4, %5 = split %3 {sizes=[32,16]} : f32[T,32], f32[T,16]\n",
            "split: sizes must add up to N",
        ),
        (
            "%4 = weight \"w\" : f16[32,64]\n%5 = matmul %3, %4 {half=gemv} : f32[T,32]\n\
             %6 = add %3, %5 : f32[T,64]\n",
            "add: b must have a's shape or be [1]",
        ),
        (
            "%4 = weight \"w\" : f16[32,64]\n%5 = matmul %3, %4 {half=gemv} : f32[T,32]\n\
             %6 = mul %3, %5 : f32[T,64]\n",
            "mul: b must have a's shape or be [1]",
        ),
        (
            "%4 = reshape %3 : f32[T,2,32]\n\
             %5, %6 = kv_append %4, %4 {layer=0, cache=f16} : f16[P+T,2,32], f16[P+T,2,32]\n\
             %7 = reshape %3 : f32[T,4,16]\n\
             %8 = attention %7, %5, %6 {scale=0.25, kq=gemv, kqv=gemv} : f32[T,4,16]\n",
            "attention: kc must be [P+T,G,D]",
        ),
    ];
    for (body, expected) in cases {
        let text = format!("{HEAD}{body}");
        let g = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let err = verify(&g)
            .expect_err(&format!("the broken graph verified\n{text}"))
            .to_string();
        assert_eq!(err, expected, "{text}");
    }
}
