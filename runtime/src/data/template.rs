//! The `internvl2_5` chat template, as InternVL's `preprocess_internvl2_5` applies it.
//!
//! A leading system turn replaces the default system prompt; each turn is
//! `<|im_start|>{user|assistant}\n{text}<|im_end|>\n` and is tokenised on its own; every
//! `<image>` of the human turns becomes `<img>` + `<IMG_CONTEXT>` x n + `</img>`, in order; labels
//! are -100 except on assistant replies and their `<|im_end|>` (the `<|im_start|>assistant\n`
//! prefix and the trailing `\n` stay masked).

use super::chat::{Role, Turn};

/// InternVL's default system prompt for the internvl2_5 template.
pub const DEFAULT_SYSTEM_PROMPT: &str = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。";

pub const IMG_START: &str = "<img>";
pub const IMG_END: &str = "</img>";
pub const IMG_CONTEXT: &str = "<IMG_CONTEXT>";
pub const IGNORE_INDEX: i64 = -100;

/// What the template needs from a tokenizer.
pub trait Encode {
    /// Token ids of `text`, with special tokens written in it recognised and nothing added.
    fn encode_text(&self, text: &str) -> Result<Vec<u32>, String>;
}

/// A templated sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Templated {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
}

/// Applies the template. `image_tokens[i]` is the number of `<IMG_CONTEXT>` tokens of the i-th
/// image (tokens per tile x tiles); with `text_only` no `<image>` is expanded.
pub fn apply(
    turns: &[Turn],
    image_tokens: &[usize],
    text_only: bool,
    enc: &dyn Encode,
) -> Result<Templated, String> {
    let (system, turns) = match turns.first() {
        Some(t) if t.role == Role::System => (t.value.as_str(), &turns[1..]),
        _ => (DEFAULT_SYSTEM_PROMPT, turns),
    };
    let mut texts: Vec<(Role, String)> = Vec::with_capacity(turns.len() + 1);
    texts.push((
        Role::System,
        format!("<|im_start|>system\n{system}<|im_end|>\n"),
    ));
    let mut next_image = 0;
    for t in turns {
        let mut value = t.value.clone();
        if !text_only && t.role == Role::Human {
            let count = value.matches("<image>").count();
            for _ in 0..count {
                if next_image == image_tokens.len() {
                    break;
                }
                let tokens = format!(
                    "{IMG_START}{}{IMG_END}",
                    IMG_CONTEXT.repeat(image_tokens[next_image])
                );
                value = value.replacen("<image>", &tokens, 1);
                next_image += 1;
            }
        }
        let text = match t.role {
            Role::Human => format!("<|im_start|>user\n{value}<|im_end|>\n"),
            Role::Gpt => format!("<|im_start|>assistant\n{value}<|im_end|>\n"),
            Role::System => return Err("a `system` turn must come first".into()),
        };
        texts.push((t.role, text));
    }
    if !text_only && next_image != image_tokens.len() {
        return Err(format!(
            "the sample has {} image(s) but {} `<image>` placeholder(s) in its human turns",
            image_tokens.len(),
            next_image
        ));
    }
    let prefix = enc.encode_text("<|im_start|>assistant\n")?.len();
    let mut out = Templated {
        input_ids: Vec::new(),
        labels: Vec::new(),
    };
    for (role, text) in &texts {
        let ids = enc.encode_text(text)?;
        let n = ids.len();
        for (i, &id) in ids.iter().enumerate() {
            out.input_ids.push(id as i64);
            let trained = *role == Role::Gpt && i >= prefix && i + 1 < n;
            out.labels
                .push(if trained { id as i64 } else { IGNORE_INDEX });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits on spaces and knows a few special tokens: enough to check the structure.
    struct Words;

    impl Encode for Words {
        fn encode_text(&self, text: &str) -> Result<Vec<u32>, String> {
            let mut out = Vec::new();
            let mut rest = text;
            let specials = [
                ("<|im_start|>", 1),
                ("<|im_end|>", 2),
                ("\n", 3),
                ("<img>", 4),
                ("</img>", 5),
                ("<IMG_CONTEXT>", 6),
            ];
            while !rest.is_empty() {
                if let Some((tok, id)) = specials.iter().find(|(t, _)| rest.starts_with(t)) {
                    out.push(*id);
                    rest = &rest[tok.len()..];
                } else {
                    let end = rest
                        .char_indices()
                        .skip(1)
                        .find(|(_, c)| "<\n".contains(*c))
                        .map_or(rest.len(), |(i, _)| i);
                    out.push(100 + rest[..end].len() as u32);
                    rest = &rest[end..];
                }
            }
            Ok(out)
        }
    }

    fn turn(role: Role, v: &str) -> Turn {
        Turn {
            role,
            value: v.into(),
        }
    }

    #[test]
    fn only_replies_and_their_end_are_labelled() {
        let t = apply(
            &[turn(Role::Human, "hi"), turn(Role::Gpt, "hello")],
            &[],
            true,
            &Words,
        )
        .unwrap();
        // system: im_start, "system", \n, prompt, im_end, \n
        // user: im_start, "user", \n, "hi", im_end, \n
        // assistant: im_start, "assistant", \n, "hello", im_end, \n
        let n = t.input_ids.len();
        assert_eq!(&t.labels[n - 6..], &[-100, -100, -100, 105, 2, -100]);
        assert!(t.labels[..n - 6].iter().all(|&l| l == -100));
    }

    #[test]
    fn images_expand_in_order_and_must_match() {
        let t = apply(
            &[turn(Role::Human, "<image><image>x"), turn(Role::Gpt, "y")],
            &[2, 1],
            false,
            &Words,
        )
        .unwrap();
        let ctx = t.input_ids.iter().filter(|&&i| i == 6).count();
        assert_eq!(ctx, 3);
        let e = apply(
            &[turn(Role::Human, "<image>x"), turn(Role::Gpt, "y")],
            &[2, 1],
            false,
            &Words,
        )
        .unwrap_err();
        assert!(e.contains("2 image(s) but 1"), "{e}");
    }

    #[test]
    fn a_system_turn_replaces_the_default_prompt() {
        let a = apply(
            &[turn(Role::System, "be brief"), turn(Role::Human, "hi")],
            &[],
            true,
            &Words,
        )
        .unwrap();
        let b = apply(&[turn(Role::Human, "hi")], &[], true, &Words).unwrap();
        assert_ne!(a.input_ids, b.input_ids);
        assert_eq!(a.input_ids[3], 108); // "be brief"
    }
}
