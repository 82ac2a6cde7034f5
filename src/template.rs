//! libvirt domain templates: domain XML with `{{placeholder}}` holes that the daemon fills per
//! slot.
//!
//! The daemon supplies the values in [`BUILTIN`]; a pool's `template_vars` supply the rest. A
//! placeholder may carry a default after a bar, `{{cmdline_extra|}}`, used when no value is
//! given. Values are XML-escaped. Templates are checked when the configuration is loaded, so a
//! placeholder without a value is a configuration error, not a failed build at 3 a.m.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Arch;

/// Placeholders whose values the daemon computes for each slot.
pub const BUILTIN: &[&str] = &[
    "name",
    "uuid",
    "domain_type",
    "cpu",
    "vcpus",
    "memory_mib",
    "disk",
    "job_port",
    "console_log",
    "nvram",
    "interface",
];

/// Built-in placeholders whose values are whole elements, inserted as they are.
const ELEMENTS: &[&str] = &["cpu", "interface"];

/// Placeholders a template must have for the daemon to manage its domains at all.
const REQUIRED: &[&str] = &["name", "disk", "job_port"];

const REFERENCE_X86_64: &str = include_str!("../vm-templates/reference-linux-x86_64.xml");
const REFERENCE_AARCH64: &str = include_str!("../vm-templates/reference-linux-aarch64.xml");

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("Cannot read template {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("Unclosed placeholder at byte {offset}")]
    Unclosed { offset: usize },
    #[error("Placeholder `{{{{{name}}}}}` has no value: set it in the pool's template_vars")]
    NoValue { name: String },
    #[error("The template lacks the required placeholder `{{{{{name}}}}}`")]
    Missing { name: String },
    #[error("The template's root element is not <domain>")]
    NotDomain,
}

/// A parsed template, cheap to clone.
#[derive(Debug, Clone)]
pub struct Template {
    origin: String,
    parts: Arc<[Part]>,
}

#[derive(Debug, PartialEq)]
enum Part {
    Text(String),
    Hole { name: String, default: Option<String> },
}

impl Template {
    pub fn load(path: &Path) -> Result<Template, TemplateError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TemplateError::Read { path: path.to_owned(), source })?;
        Template::parse(&path.display().to_string(), &text)
    }

    /// The built-in template of the Linux reference guest for `arch`.
    pub fn reference(arch: Arch) -> Template {
        let text = match arch {
            Arch::X86_64 => REFERENCE_X86_64,
            Arch::Aarch64 => REFERENCE_AARCH64,
        };
        let origin = format!("built-in reference-linux-{}", arch.as_str());
        Template::parse(&origin, text).expect("built-in templates parse")
    }

    pub fn parse(origin: &str, text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut offset = 0;
        while let Some(start) = rest.find("{{") {
            let end = rest[start..].find("}}").ok_or(TemplateError::Unclosed { offset })?;
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let inner = rest[start + 2..start + end].trim();
            let (name, default) = match inner.split_once('|') {
                Some((name, default)) => (name.trim(), Some(default.to_owned())),
                None => (inner, None),
            };
            parts.push(Part::Hole { name: name.to_owned(), default });
            offset += start + end + 2;
            rest = &rest[start + end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        let template = Template { origin: origin.to_owned(), parts: parts.into() };
        if !template.first_text().trim_start().trim_start_matches_comments().starts_with("<domain")
        {
            return Err(TemplateError::NotDomain);
        }
        Ok(template)
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether the template has the placeholder `name`.
    pub fn uses(&self, name: &str) -> bool {
        self.holes().any(|(hole, _)| hole == name)
    }

    /// Checks that the template has the required placeholders and that each of its
    /// placeholders gets a value: from the daemon, from `vars`, or from its default.
    pub fn check<'a>(
        &self,
        vars: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<(), TemplateError> {
        for required in REQUIRED {
            if !self.uses(required) {
                return Err(TemplateError::Missing { name: (*required).to_owned() });
            }
        }
        for (name, default) in self.holes() {
            let known = BUILTIN.contains(&name) || vars.clone().any(|v| v == name);
            if !known && default.is_none() {
                return Err(TemplateError::NoValue { name: name.to_owned() });
            }
        }
        Ok(())
    }

    /// Fills the placeholders with XML-escaped `values`.
    pub fn render(&self, values: &BTreeMap<String, String>) -> Result<String, TemplateError> {
        let mut out = String::new();
        for part in self.parts.iter() {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Hole { name, default } => {
                    let value = values.get(name).or(default.as_ref());
                    let value =
                        value.ok_or_else(|| TemplateError::NoValue { name: name.clone() })?;
                    if ELEMENTS.contains(&name.as_str()) {
                        out.push_str(value);
                    } else {
                        out.push_str(&xml_escape(value));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Whether the domain has an emulated TPM, whose state lives outside the template's files.
    pub fn has_tpm(&self) -> bool {
        self.parts.iter().any(|part| matches!(part, Part::Text(text) if text.contains("<tpm")))
    }

    fn holes(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.parts.iter().filter_map(|part| match part {
            Part::Hole { name, default } => Some((name.as_str(), default.as_deref())),
            Part::Text(_) => None,
        })
    }

    fn first_text(&self) -> &str {
        match self.parts.first() {
            Some(Part::Text(text)) => text,
            _ => "",
        }
    }
}

trait SkipComments {
    fn trim_start_matches_comments(&self) -> &str;
}

impl SkipComments for str {
    /// Skips leading XML comments and an XML declaration, which may precede `<domain>`.
    fn trim_start_matches_comments(&self) -> &str {
        let mut rest = self.trim_start();
        loop {
            if let Some(after) = rest.strip_prefix("<!--") {
                match after.find("-->") {
                    Some(end) => rest = after[end + 3..].trim_start(),
                    None => return rest,
                }
            } else if let Some(after) = rest.strip_prefix("<?") {
                match after.find("?>") {
                    Some(end) => rest = after[end + 2..].trim_start(),
                    None => return rest,
                }
            } else {
                return rest;
            }
        }
    }
}

pub fn xml_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// The inverse of [`xml_escape`], for values read back from XML that libvirt wrote.
pub fn xml_unescape(value: &str) -> String {
    value
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&apos;", "'")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const SMALL: &str = "<domain><name>{{name}}</name><disk>{{ disk }}</disk>\
        <port>{{job_port}}</port><extra>{{extra|none}}</extra></domain>";

    #[test]
    fn render_fills_escapes_and_uses_defaults() {
        let template = Template::parse("t", SMALL).unwrap();
        let xml = template
            .render(&values(&[("name", "a&b"), ("disk", "/d<1>"), ("job_port", "/p")]))
            .unwrap();
        assert_eq!(
            xml,
            "<domain><name>a&amp;b</name><disk>/d&lt;1&gt;</disk>\
             <port>/p</port><extra>none</extra></domain>"
        );
    }

    #[test]
    fn check_reports_placeholders_without_values_and_missing_required_ones() {
        let template =
            Template::parse("t", "<domain>{{name}}{{disk}}{{job_port}}{{kernel}}</domain>")
                .unwrap();
        assert!(
            matches!(template.check([].into_iter()), Err(TemplateError::NoValue { name }) if name == "kernel")
        );
        template.check(["kernel"].into_iter()).unwrap();

        let no_port = Template::parse("t", "<domain>{{name}}{{disk}}</domain>").unwrap();
        assert!(
            matches!(no_port.check([].into_iter()), Err(TemplateError::Missing { name }) if name == "job_port")
        );
    }

    #[test]
    fn parse_rejects_unclosed_placeholders_and_other_roots() {
        assert!(matches!(
            Template::parse("t", "<domain>{{name</domain>"),
            Err(TemplateError::Unclosed { .. })
        ));
        assert!(matches!(Template::parse("t", "<network/>"), Err(TemplateError::NotDomain)));
        Template::parse("t", "<?xml version='1.0'?>\n<!-- c -->\n<domain/>").unwrap();
    }

    #[test]
    fn reference_templates_need_only_kernel_and_initrd() {
        for arch in [Arch::X86_64, Arch::Aarch64] {
            let template = Template::reference(arch);
            template.check(["kernel", "initrd"].into_iter()).unwrap();
            assert!(!template.uses("nvram"));
        }
    }
}
