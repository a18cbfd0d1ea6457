package translate

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"
)

// parseJSON decodes __json, keeping numbers as written.
func parseJSON(js string) (map[string]any, error) {
	dec := json.NewDecoder(strings.NewReader(js))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, err
	}
	return m, nil
}

// structuredFeatures returns requiredSystemFeatures of a structured-attrs
// derivation.
func structuredFeatures(js string) []string {
	m, err := parseJSON(js)
	if err != nil {
		return nil
	}
	l, _ := m["requiredSystemFeatures"].([]any)
	var fs []string
	for _, v := range l {
		if s, ok := v.(string); ok {
			fs = append(fs, s)
		}
	}
	return fs
}

// structuredAttrs writes /build/.attrs.json and /build/.attrs.sh as Nix
// 2.8 does: __json with "outputs" mapping each output to its path and
// exportReferencesGraph entries expanded, dumped the way nlohmann::json
// dumps (sorted keys, compact), and a shell rendering of its simple
// values.
func (t *translation) structuredAttrs(js string) error {
	m, err := parseJSON(js)
	if err != nil {
		return err
	}
	outputs := map[string]any{}
	for name, o := range t.d.Outputs {
		outputs[name] = o.Path
	}
	m["outputs"] = outputs
	if e, ok := m["exportReferencesGraph"].(map[string]any); ok {
		for k, v := range e {
			var paths []string
			switch v := v.(type) {
			case []any:
				for _, p := range v {
					s, ok := p.(string)
					if !ok {
						return fmt.Errorf("exportReferencesGraph.%s: not a list of strings", k)
					}
					paths = append(paths, s)
				}
			case string:
				paths = []string{v}
			default:
				return fmt.Errorf("exportReferencesGraph.%s: not a list of strings", k)
			}
			closure, err := t.exportReferences(paths)
			if err != nil {
				return err
			}
			var infos []any
			for _, p := range closure {
				info := t.closure[p]
				refs := make([]any, len(info.References))
				for i, r := range info.References {
					refs[i] = r
				}
				var closureSize uint64
				sub, _ := t.exportReferences([]string{p})
				for _, s := range sub {
					closureSize += t.closure[s].NarSize
				}
				o := map[string]any{
					"closureSize": json.Number(strconv.FormatUint(closureSize, 10)),
					"narHash":     "sha256:" + nix32(info.NarSha256),
					"narSize":     json.Number(strconv.FormatUint(info.NarSize, 10)),
					"path":        p,
					"references":  refs,
				}
				if info.Ca != "" {
					o["ca"] = info.Ca
				}
				infos = append(infos, o)
			}
			m[k] = infos
		}
	}
	var buf bytes.Buffer
	dump(&buf, m)
	t.addBuildFile(".attrs.json", []byte(t.rewrite.Replace(buf.String())))
	t.addBuildFile(".attrs.sh", []byte(t.rewrite.Replace(shellAttrs(m))))
	return nil
}

// dump writes v as nlohmann::json's dump() does.
func dump(b *bytes.Buffer, v any) {
	switch v := v.(type) {
	case nil:
		b.WriteString("null")
	case bool:
		b.WriteString(strconv.FormatBool(v))
	case json.Number:
		b.WriteString(number(v))
	case string:
		dumpString(b, v)
	case []any:
		b.WriteByte('[')
		for i, e := range v {
			if i > 0 {
				b.WriteByte(',')
			}
			dump(b, e)
		}
		b.WriteByte(']')
	case map[string]any:
		keys := make([]string, 0, len(v))
		for k := range v {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		b.WriteByte('{')
		for i, k := range keys {
			if i > 0 {
				b.WriteByte(',')
			}
			dumpString(b, k)
			b.WriteByte(':')
			dump(b, v[k])
		}
		b.WriteByte('}')
	}
}

// number renders a JSON number as nlohmann does: integers as written,
// floating-point numbers in their shortest round-trip form, with ".0" when
// that form looks like an integer.
func number(n json.Number) string {
	s := string(n)
	if !strings.ContainsAny(s, ".eE") {
		return s
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsInf(f, 0) || math.IsNaN(f) {
		return s
	}
	out := strconv.FormatFloat(f, 'g', -1, 64)
	if !strings.ContainsAny(out, ".e") {
		out += ".0"
	}
	return out
}

func dumpString(b *bytes.Buffer, s string) {
	b.WriteByte('"')
	for i := 0; i < len(s); {
		c := s[i]
		switch c {
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		case '\b':
			b.WriteString(`\b`)
		case '\f':
			b.WriteString(`\f`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		default:
			if c < 0x20 {
				fmt.Fprintf(b, `\u%04x`, c)
			} else if c < utf8.RuneSelf {
				b.WriteByte(c)
			} else {
				_, n := utf8.DecodeRuneInString(s[i:])
				b.WriteString(s[i : i+n])
				i += n
				continue
			}
		}
		i++
	}
	b.WriteByte('"')
}

var shVarName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// shellAttrs renders the .attrs.sh of Nix 2.8: a declare line for every
// attribute whose name is a shell variable name and whose value is a
// string, an integer or null, or a list or map of those.
func shellAttrs(m map[string]any) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		if !shVarName.MatchString(k) {
			continue
		}
		v := m[k]
		if s, ok := simple(v); ok {
			fmt.Fprintf(&b, "declare %s=%s\n", k, s)
			continue
		}
		switch v := v.(type) {
		case []any:
			var s2 strings.Builder
			good := true
			for _, e := range v {
				s3, ok := simple(e)
				if !ok {
					good = false
					break
				}
				s2.WriteString(s3 + " ")
			}
			if good {
				fmt.Fprintf(&b, "declare -a %s=(%s)\n", k, s2.String())
			}
		case map[string]any:
			keys2 := make([]string, 0, len(v))
			for k2 := range v {
				keys2 = append(keys2, k2)
			}
			sort.Strings(keys2)
			var s2 strings.Builder
			good := true
			for _, k2 := range keys2 {
				s3, ok := simple(v[k2])
				if !ok {
					good = false
					break
				}
				fmt.Fprintf(&s2, "[%s]=%s ", shellEscape(k2), s3)
			}
			if good {
				fmt.Fprintf(&b, "declare -A %s=(%s)\n", k, s2.String())
			}
		}
	}
	return b.String()
}

// simple renders a simple value for .attrs.sh as Nix 2.8's
// handleSimpleType does: strings escaped, null as ”, true as 1 and false
// as the empty string, and numbers whose value (as a float) is whole as a
// C int; other numbers are not simple.
func simple(v any) (string, bool) {
	switch v := v.(type) {
	case string:
		return shellEscape(v), true
	case nil:
		return "''", true
	case bool:
		if v {
			return "1", true
		}
		return "", true
	case json.Number:
		f, err := strconv.ParseFloat(string(v), 64)
		if err != nil {
			return "", false
		}
		f32 := float64(float32(f))
		if math.Ceil(f32) != f32 {
			return "", false
		}
		if i, err := strconv.ParseInt(string(v), 10, 64); err == nil {
			return strconv.Itoa(int(int32(i))), true
		}
		if f < math.MinInt32 || f > math.MaxInt32 {
			return strconv.Itoa(math.MinInt32), true // x86's cvttsd2si
		}
		return strconv.Itoa(int(int32(f))), true
	}
	return "", false
}

func shellEscape(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
