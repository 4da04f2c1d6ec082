//! Calibration data: tokenization identical to the Python `tokenizers` library (fixture from
//! `tools/parity/gen_fixtures.py`), windows without padding, typed errors, fingerprints.

use fourbit_forge::calib::data::{
    calibration_samples, fingerprint, parse_documents, take_windows, tokenize_stream, CalibFormat, CalibSettings,
};
use fourbit_forge::ForgeError;
use tokenizers::Tokenizer;

const TOKENIZER: &str = include_str!("../testdata/parity/tokenizer/tokenizer.json");
const EXPECTED: &str = include_str!("../testdata/parity/tokenizer/tokenizer_expected.json");

fn tokenizer() -> Tokenizer {
    TOKENIZER.parse().expect("tokenizer.json parses")
}

#[test]
fn tokenization_matches_the_python_tokenizers_library() {
    let tok = tokenizer();
    let expected: serde_json::Value = serde_json::from_str(EXPECTED).expect("json");
    let samples = expected["samples"].as_array().expect("samples");
    assert!(!samples.is_empty());
    for s in samples {
        let text = s["text"].as_str().expect("text");
        let ids: Vec<u32> = s["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
        let ours = tok.encode(text, false).expect("encode");
        assert_eq!(ours.get_ids(), ids.as_slice(), "{text:?}");
    }
}

#[test]
fn windows_are_contiguous_unpadded_and_spread_over_the_stream() {
    let stream: Vec<u32> = (100..200).collect();
    let s = CalibSettings { samples: 4, seq_len: 10, bos: Some(1), separator: None };
    let w = take_windows(&stream, &s).expect("windows");
    assert_eq!(w.len(), 4);
    for (i, win) in w.iter().enumerate() {
        assert_eq!(win.len(), 10);
        assert_eq!(win[0], 1);
        let start = 100 + 25 * i as u32;
        assert_eq!(&win[1..], (start..start + 9).collect::<Vec<_>>().as_slice());
    }
    // Without BOS every token comes from the stream.
    let s = CalibSettings { samples: 10, seq_len: 10, bos: None, separator: None };
    let w = take_windows(&stream, &s).expect("exactly enough");
    assert_eq!(w.concat(), stream);
    // Too little text: typed error naming the counts, never padding.
    let s = CalibSettings { samples: 11, seq_len: 10, bos: None, separator: None };
    let err = take_windows(&stream, &s).expect_err("not enough");
    assert!(matches!(&err, ForgeError::Config(m) if m.contains("100 tokens") && m.contains("110")), "{err}");
    for (samples, seq_len, bos) in [(0, 10, None), (2, 0, None), (2, 1, Some(1))] {
        let s = CalibSettings { samples, seq_len, bos, separator: None };
        assert!(matches!(take_windows(&stream, &s), Err(ForgeError::Config(_))));
    }
    let s = CalibSettings { samples: usize::MAX, seq_len: 3, bos: None, separator: None };
    assert!(matches!(take_windows(&stream, &s), Err(ForgeError::Config(_))), "overflow is an error");
}

#[test]
fn jsonl_and_text_documents() {
    let docs =
        parse_documents("{\"text\": \"a b\"}\n\n{\"text\": \"c\", \"id\": 3}\n", CalibFormat::Jsonl).expect("jsonl");
    assert_eq!(docs, ["a b", "c"]);
    let err = parse_documents("{\"text\": \"a\"}\n{\"txt\": \"b\"}\n", CalibFormat::Jsonl).expect_err("no text");
    assert!(matches!(&err, ForgeError::Config(m) if m.contains("line 2")), "{err}");
    assert!(matches!(parse_documents("{oops", CalibFormat::Jsonl), Err(ForgeError::Config(m)) if m.contains("line 1")));
    assert_eq!(parse_documents("one\n\ntwo", CalibFormat::Text).expect("text"), ["one\n\ntwo"]);
    assert!(parse_documents("  \n", CalibFormat::Text).expect("blank").is_empty());
    assert_eq!(CalibFormat::from_path("x/data.JSONL".as_ref()), CalibFormat::Jsonl);
    assert_eq!(CalibFormat::from_path("x/data.txt".as_ref()), CalibFormat::Text);
}

#[test]
fn samples_and_fingerprint_from_text() {
    let tok = tokenizer();
    let docs: Vec<String> = (0..20).map(|i| format!("Document {i}: the Hessian of layer {i} is 2/n X^T X.")).collect();
    let s = CalibSettings { samples: 6, seq_len: 12, bos: Some(1), separator: Some(2) };
    let a = calibration_samples(&tok, &docs, &s).expect("samples");
    assert_eq!(a.sequences.len(), 6);
    assert!(a.sequences.iter().all(|q| q.len() == 12 && q[0] == 1));
    assert_eq!(a.documents, 20);
    let stream = tokenize_stream(&tok, &docs, Some(2)).expect("stream");
    assert_eq!(a.stream_tokens, stream.len());
    // Separators sit between documents only.
    assert_eq!(stream.iter().filter(|&&t| t == 2).count(), 19);
    assert_eq!(a.fingerprint.len(), 64);
    // Deterministic, and sensitive to the samples and to every setting.
    assert_eq!(calibration_samples(&tok, &docs, &s).expect("again").fingerprint, a.fingerprint);
    let mut fps = vec![a.fingerprint.clone()];
    for other in [
        CalibSettings { samples: 5, ..s.clone() },
        CalibSettings { seq_len: 11, ..s.clone() },
        CalibSettings { bos: None, ..s.clone() },
        CalibSettings { separator: None, ..s.clone() },
    ] {
        fps.push(calibration_samples(&tok, &docs, &other).expect("variant").fingerprint);
    }
    let mut changed = a.sequences.clone();
    changed[3][5] ^= 1;
    fps.push(fingerprint(&changed, &s));
    let unique: std::collections::BTreeSet<&String> = fps.iter().collect();
    assert_eq!(unique.len(), fps.len(), "every change moves the fingerprint");
}
