//! `bitnetc inspect`.

use super::{Result, human_bytes, human_count};
use crate::InspectArgs;
use bitnetc::gguf::describe::{self, ConfigOutcome, Description};
use bitnetc::gguf::{GgufFile, ModelConfig};

pub fn inspect(a: InspectArgs) -> Result<()> {
    let file = if bitnetc::bplan::is_plan(&a.file) {
        let (header, _) = bitnetc::bplan::read_manifest(&a.file)?;
        if !a.json {
            print!("{}", bitnetc::bplan::describe(&a.file)?);
        }
        GgufFile::open_range(&a.file, header.image.0, Some(header.image.1))?
    } else {
        GgufFile::open(&a.file)?
    };
    let d = describe::describe(&file, a.tensors);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print!("{}", render_description(&d));
    }
    Ok(())
}

fn render_description(d: &Description) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(
        w,
        "file        {} ({}, {} bytes)",
        d.file,
        human_bytes(d.file_bytes),
        d.file_bytes
    );
    let _ = writeln!(
        w,
        "gguf        version {}, alignment {}, data at byte {}",
        d.gguf_version, d.alignment, d.data_offset
    );
    let _ = writeln!(
        w,
        "type ids    {} table: {}",
        d.type_table, d.type_table_reason
    );
    let _ = writeln!(w, "\nmetadata ({} keys)", d.metadata.len());
    let kw = d.metadata.iter().map(|m| m.key.len()).max().unwrap_or(0);
    let tw = d
        .metadata
        .iter()
        .map(|m| m.type_description.len())
        .max()
        .unwrap_or(0);
    for m in &d.metadata {
        let _ = writeln!(
            w,
            "  {:kw$}  {:tw$}  {}",
            m.key, m.type_description, m.display
        );
    }
    let _ = writeln!(w, "\nmodel");
    match &d.config {
        ConfigOutcome::Valid(c) => render_config(w, c),
        ConfigOutcome::Invalid(e) => {
            let _ = writeln!(w, "  cannot be loaded: {e}");
        }
    }
    let t = &d.totals;
    let _ = writeln!(
        w,
        "\ntensors     {} tensors, {} parameters, {} of tensor data",
        t.tensors,
        human_count(t.parameters),
        human_bytes(t.bytes)
    );
    for bt in &t.by_type {
        let _ = writeln!(
            w,
            "  {:8} {:4} tensor{}  {:>9} parameters  {:>11}",
            bt.type_name,
            bt.tensors,
            if bt.tensors == 1 { " " } else { "s" },
            human_count(bt.parameters),
            human_bytes(bt.bytes)
        );
    }
    let _ = writeln!(w, "\ntokenizer");
    match (&d.tokenizer, &d.tokenizer_error) {
        (_, Some(e)) => {
            let _ = writeln!(w, "  invalid: {e}");
        }
        (None, None) => {
            let _ = writeln!(w, "  none (no tokenizer.ggml.model)");
        }
        (Some(tk), None) => {
            let pre = match &tk.pre {
                Some(p) => format!("pre-tokenizer '{p}'"),
                None => "no pre-tokenizer named (bitnet.cpp then uses its DEFAULT rules)".into(),
            };
            let merges = tk.merges.map_or(String::new(), |m| format!(", {m} merges"));
            let _ = writeln!(
                w,
                "  {} vocabulary, {} tokens{merges}, {pre}",
                tk.model, tk.tokens
            );
            let mut specials = Vec::new();
            for (label, tok) in [
                ("bos", &tk.bos),
                ("eos", &tk.eos),
                ("eot", &tk.eot),
                ("pad", &tk.padding),
                ("unk", &tk.unknown),
            ] {
                if let Some(tok) = tok {
                    specials.push(format!(
                        "{label} {} {}",
                        tok.id,
                        bitnetc::gguf::gguf::quote_cut(&tok.text, 40)
                    ));
                }
            }
            if !specials.is_empty() {
                let _ = writeln!(w, "  {}", specials.join(", "));
            }
            let flag = |b: Option<bool>| b.map_or("unset".to_string(), |b| b.to_string());
            let template = tk
                .chat_template_chars
                .map_or("no chat template".to_string(), |n| {
                    format!("chat template of {n} characters")
                });
            let _ = writeln!(
                w,
                "  add_bos {}, add_eos {}, {template}",
                flag(tk.add_bos),
                flag(tk.add_eos)
            );
        }
    }
    if let Some(tensors) = &d.tensors {
        let nw = tensors
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            w,
            "\n  {:nw$}  {:8}  {:>22}  {:>12}  {:>12}",
            "name", "type", "dims", "bytes", "offset"
        );
        for t in tensors {
            let dims = t
                .dims
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" x ");
            let _ = writeln!(
                w,
                "  {:nw$}  {:8}  {:>22}  {:>12}  {:>12}",
                t.name, t.type_name, dims, t.nbytes, t.offset
            );
        }
    }
    s
}

fn render_config(w: &mut String, c: &ModelConfig) {
    use std::fmt::Write;
    let act = match c.ffn_activation {
        bitnetc::gguf::Activation::Relu2 => "relu² GLU",
        bitnetc::gguf::Activation::Silu => "SiLU GLU",
    };
    let head = if c.tied_output {
        "tied output head"
    } else {
        "separate output head"
    };
    let sub = if c.sub_norms { ", SubLN" } else { "" };
    let scales = if c.weight_scales {
        ", per-matrix scales"
    } else {
        ""
    };
    let _ = writeln!(
        w,
        "  architecture  {} ({act}{sub}, {} RoPE, {head}{scales})",
        c.architecture,
        match c.rope_style {
            bitnetc::gguf::RopeStyle::Neox => "NEOX",
            bitnetc::gguf::RopeStyle::Norm => "NORM",
        }
    );
    if let Some(n) = &c.name {
        let _ = writeln!(w, "  name          {n}");
    }
    let _ = writeln!(
        w,
        "  dims          vocab {}, context {}, hidden {}, layers {}, ffn {}",
        c.vocab_size, c.context_length, c.hidden, c.layers, c.ffn
    );
    let _ = writeln!(
        w,
        "  attention     {} heads, {} kv heads, head dim {}, rope {} dims, theta {}",
        c.heads, c.kv_heads, c.head_dim, c.rope_dims, c.rope_theta
    );
    let _ = writeln!(w, "  rms eps       {}", c.rms_eps);
    let _ = writeln!(w, "  parameters    {}", human_count(c.parameter_count()));
}
