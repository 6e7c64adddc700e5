//! The `chat_template` option: `auto` (the template most input models share), a bundled name
//! (`chatml`), or Jinja text, written into the output's tokenizer configuration.

use std::path::Path;

use crate::config::MergeConfig;
use crate::error::{Error, Result};
use crate::plan::ModelSet;

/// ChatML, the `<|im_start|>role\ncontent<|im_end|>` format.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Named templates amalgam bundles.
const BUNDLED: &[(&str, &str)] = &[("chatml", CHATML)];

fn read_template(dir: &Path) -> Option<String> {
    if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Some(t.trim().to_string());
    }
    let text = std::fs::read(dir.join("tokenizer_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v.get("chat_template")?
        .as_str()
        .map(|s| s.trim().to_string())
}

/// Resolve `setting` and write it into `out_dir`'s tokenizer configuration.
pub fn apply(config: &MergeConfig, set: &ModelSet, out_dir: &Path, setting: &str) -> Result<()> {
    let template = if setting == "auto" {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for m in &set.models {
            if let Some(t) = read_template(&m.dir) {
                match counts.iter_mut().find(|(x, _)| *x == t) {
                    Some((_, c)) => *c += 1,
                    None => counts.push((t, 1)),
                }
            }
        }
        match counts.into_iter().max_by_key(|(_, c)| *c) {
            Some((t, _)) => t,
            None => return Ok(()),
        }
    } else if let Some((_, t)) = BUNDLED.iter().find(|(n, _)| *n == setting) {
        t.to_string()
    } else if setting.len() >= 20 && setting.contains('{') {
        setting.to_string()
    } else {
        let names: Vec<_> = BUNDLED.iter().map(|(n, _)| *n).collect();
        return Err(config.error(format!(
            "chat_template '{setting}' is neither 'auto', a bundled template ({}), nor Jinja template text",
            names.join(", ")
        )));
    };
    let path = out_dir.join("tokenizer_config.json");
    let mut v: serde_json::Value = std::fs::read(&path)
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    if let Some(obj) = v.as_object_mut() {
        obj.insert("chat_template".into(), template.clone().into());
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&v).expect("json"))
        .map_err(|e| Error::io(&path, e))?;
    let jinja = out_dir.join("chat_template.jinja");
    if jinja.exists() {
        std::fs::write(&jinja, template).map_err(|e| Error::io(&jinja, e))?;
    }
    Ok(())
}
