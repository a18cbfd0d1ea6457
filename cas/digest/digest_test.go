package digest_test

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/digest"
)

const (
	sha256Empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
	sha256ABC   = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
	blake3Empty = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
	blake3ABC   = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
)

// wantInvalid fails the test unless err is an INVALID_ARGUMENT status whose
// message contains every one of substrs.
func wantInvalid(t *testing.T, err error, substrs ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got nil error, want InvalidArgument")
	}
	if c := status.Code(err); c != codes.InvalidArgument {
		t.Fatalf("got code %v (%v), want InvalidArgument", c, err)
	}
	msg := status.Convert(err).Message()
	for _, s := range substrs {
		if !strings.Contains(msg, s) {
			t.Errorf("error message %q does not contain %q", msg, s)
		}
	}
}

func mustParse(t testing.TB, fn digest.Function, h string, size int64) digest.Digest {
	t.Helper()
	d, err := digest.Parse(fn, h, size)
	if err != nil {
		t.Fatalf("Parse(%v, %q, %d): %v", fn, h, size, err)
	}
	return d
}

func TestComputeKnownVectors(t *testing.T) {
	for _, tc := range []struct {
		fn   digest.Function
		data string
		hex  string
	}{
		{digest.SHA256, "", sha256Empty},
		{digest.SHA256, "abc", sha256ABC},
		{digest.BLAKE3, "", blake3Empty},
		{digest.BLAKE3, "abc", blake3ABC},
	} {
		t.Run(tc.fn.String()+"/"+tc.data, func(t *testing.T) {
			d := digest.Compute(tc.fn, []byte(tc.data))
			if got := d.Hex(); got != tc.hex {
				t.Errorf("Compute(%v, %q).Hex() = %s, want %s", tc.fn, tc.data, got, tc.hex)
			}
			if d.Size() != int64(len(tc.data)) {
				t.Errorf("Size() = %d, want %d", d.Size(), len(tc.data))
			}
			if d.Function() != tc.fn {
				t.Errorf("Function() = %v, want %v", d.Function(), tc.fn)
			}
			if d.IsZero() {
				t.Error("IsZero() = true for a computed digest")
			}
			raw := d.Hash()
			if hex.EncodeToString(raw[:]) != tc.hex {
				t.Errorf("Hash() = %x, want %s", raw, tc.hex)
			}
			if p := mustParse(t, tc.fn, tc.hex, int64(len(tc.data))); p != d {
				t.Errorf("Parse = %v, want %v", p, d)
			}
			// The streaming hasher agrees with Compute.
			h := tc.fn.New()
			h.Write([]byte(tc.data))
			if got := hex.EncodeToString(h.Sum(nil)); got != tc.hex {
				t.Errorf("New().Sum = %s, want %s", got, tc.hex)
			}
			if tc.data == "" && digest.Empty(tc.fn) != d {
				t.Errorf("Empty(%v) = %v, want %v", tc.fn, digest.Empty(tc.fn), d)
			}
		})
	}
}

func TestComputeFunctionsDiffer(t *testing.T) {
	a := digest.Compute(digest.SHA256, []byte("x"))
	b := digest.Compute(digest.BLAKE3, []byte("x"))
	if a == b {
		t.Fatal("SHA256 and BLAKE3 digests of the same data compare equal")
	}
	// Same hash bytes under different functions are different digests.
	c := digest.New(digest.BLAKE3, a.Hash(), a.Size())
	if a == c {
		t.Fatal("digests differing only in function compare equal")
	}
}

func TestComputeInvalidFunctionPanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("Compute(0, ...) did not panic")
		}
	}()
	digest.Compute(0, nil)
}

func TestNew(t *testing.T) {
	var h [digest.HashSize]byte
	h[0] = 1
	d := digest.New(digest.BLAKE3, h, 7)
	if d.Function() != digest.BLAKE3 || d.Hash() != h || d.Size() != 7 {
		t.Errorf("New returned %v", d.Sprint())
	}
	for _, tc := range []struct {
		name string
		fn   digest.Function
		size int64
	}{
		{"negative size", digest.SHA256, -1},
		{"zero function", 0, 0},
		{"unknown function", 3, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Fatalf("New(%d, _, %d) did not panic", tc.fn, tc.size)
				}
			}()
			digest.New(tc.fn, h, tc.size)
		})
	}
}

func TestZeroDigest(t *testing.T) {
	var d digest.Digest
	if !d.IsZero() {
		t.Error("zero Digest: IsZero() = false")
	}
	if digest.Empty(digest.SHA256).IsZero() {
		t.Error("Empty(SHA256).IsZero() = true")
	}
}

func TestParseValid(t *testing.T) {
	for _, fn := range digest.Functions {
		for _, size := range []int64{0, 1, 1 << 40, 1<<63 - 1} {
			d := mustParse(t, fn, sha256ABC, size)
			if d.Hex() != sha256ABC || d.Size() != size || d.Function() != fn {
				t.Errorf("Parse(%v, %s, %d) = %s", fn, sha256ABC, size, d.Sprint())
			}
		}
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		fn   digest.Function
		hash string
		size int64
		want []string
	}{
		{"empty hash", digest.SHA256, "", 0, []string{"length 0", "64 hex digits"}},
		{"too short", digest.SHA256, sha256ABC[:63], 3, []string{"length 63", "64 hex digits"}},
		{"too long", digest.BLAKE3, sha256ABC + "0", 3, []string{"length 65", "64 hex digits", "blake3"}},
		{"sha1 length", digest.SHA256, "a9993e364706816aba3e25717850c26c9cd0d89d", 3, []string{"length 40"}},
		{"sha512 length", digest.SHA256, sha256ABC + sha256ABC, 3, []string{"length 128"}},
		{"uppercase", digest.SHA256, strings.ToUpper(sha256ABC), 3, []string{"not lowercase hex", "byte 0", "'B'"}},
		{"one uppercase", digest.SHA256, sha256ABC[:10] + "F" + sha256ABC[11:], 3, []string{"not lowercase hex", "byte 10", "'F'"}},
		{"non-hex letter", digest.BLAKE3, "g" + blake3ABC[1:], 3, []string{"not lowercase hex", "byte 0", "'g'"}},
		{"space", digest.SHA256, sha256ABC[:63] + " ", 3, []string{"not lowercase hex", "byte 63"}},
		{"NUL", digest.SHA256, sha256ABC[:5] + "\x00" + sha256ABC[6:], 3, []string{"not lowercase hex", "byte 5"}},
		{"slash", digest.SHA256, sha256ABC[:5] + "/" + sha256ABC[6:], 3, []string{"not lowercase hex"}},
		{"non-ASCII", digest.SHA256, "é" + sha256ABC[2:], 3, []string{"not lowercase hex", "byte 0"}},
		{"negative size", digest.SHA256, sha256ABC, -1, []string{"negative size", "-1"}},
		{"min int64 size", digest.BLAKE3, blake3ABC, -1 << 63, []string{"negative size"}},
		{"zero function", 0, sha256ABC, 3, []string{"unsupported digest function"}},
		{"unknown function", 9, sha256ABC, 3, []string{"unsupported digest function"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := digest.Parse(tc.fn, tc.hash, tc.size)
			wantInvalid(t, err, tc.want...)
			if !d.IsZero() {
				t.Errorf("Parse returned non-zero digest %v with error", d.Sprint())
			}
		})
	}
}

func TestParseLongHashMessageTruncated(t *testing.T) {
	long := strings.Repeat("a", 10000)
	_, err := digest.Parse(digest.SHA256, long, 1)
	wantInvalid(t, err, "length 10000", "...")
	if msg := status.Convert(err).Message(); len(msg) > 300 {
		t.Errorf("error message for a long hash is %d bytes long; want it truncated", len(msg))
	}
}

func TestFromProto(t *testing.T) {
	d, err := digest.FromProto(digest.BLAKE3, &repb.Digest{Hash: blake3ABC, SizeBytes: 3})
	if err != nil {
		t.Fatal(err)
	}
	if want := digest.Compute(digest.BLAKE3, []byte("abc")); d != want {
		t.Errorf("FromProto = %v, want %v", d, want)
	}
	_, err = digest.FromProto(digest.SHA256, nil)
	wantInvalid(t, err, "missing")
	_, err = digest.FromProto(digest.SHA256, &repb.Digest{Hash: "xyz", SizeBytes: 3})
	wantInvalid(t, err, "length 3")
	_, err = digest.FromProto(digest.SHA256, &repb.Digest{Hash: sha256ABC, SizeBytes: -3})
	wantInvalid(t, err, "negative size")
}

func TestProtoRoundTrip(t *testing.T) {
	for _, fn := range digest.Functions {
		d := digest.Compute(fn, []byte("hello"))
		p := d.Proto()
		if p.GetHash() != d.Hex() || p.GetSizeBytes() != 5 {
			t.Errorf("Proto() = %v", p)
		}
		back, err := digest.FromProto(fn, p)
		if err != nil || back != d {
			t.Errorf("FromProto(Proto()) = %v, %v; want %v", back, err, d)
		}
	}
}

func TestFunctionFromProto(t *testing.T) {
	for _, tc := range []struct {
		in   repb.DigestFunction_Value
		want digest.Function
	}{
		{repb.DigestFunction_UNKNOWN, digest.SHA256},
		{repb.DigestFunction_SHA256, digest.SHA256},
		{repb.DigestFunction_BLAKE3, digest.BLAKE3},
	} {
		got, err := digest.FunctionFromProto(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("FunctionFromProto(%v) = %v, %v; want %v", tc.in, got, err, tc.want)
		}
	}
	for _, v := range []repb.DigestFunction_Value{
		repb.DigestFunction_MD5,
		repb.DigestFunction_SHA1,
		repb.DigestFunction_SHA384,
		repb.DigestFunction_SHA512,
		repb.DigestFunction_VSO,
		repb.DigestFunction_SHA256TREE,
		repb.DigestFunction_Value(999),
	} {
		t.Run(v.String(), func(t *testing.T) {
			got, err := digest.FunctionFromProto(v)
			wantInvalid(t, err, "not supported", "sha256", "blake3")
			if got != 0 {
				t.Errorf("FunctionFromProto(%v) returned %v with an error", v, got)
			}
		})
	}
	_, err := digest.FunctionFromProto(repb.DigestFunction_MD5)
	wantInvalid(t, err, "MD5")
}

func TestFunctionMethods(t *testing.T) {
	for _, tc := range []struct {
		fn    digest.Function
		name  string
		proto repb.DigestFunction_Value
	}{
		{digest.SHA256, "sha256", repb.DigestFunction_SHA256},
		{digest.BLAKE3, "blake3", repb.DigestFunction_BLAKE3},
	} {
		if got := tc.fn.String(); got != tc.name {
			t.Errorf("String() = %q, want %q", got, tc.name)
		}
		if got := tc.fn.Proto(); got != tc.proto {
			t.Errorf("%v.Proto() = %v, want %v", tc.fn, got, tc.proto)
		}
		if got, ok := digest.FunctionFromName(tc.name); !ok || got != tc.fn {
			t.Errorf("FunctionFromName(%q) = %v, %v", tc.name, got, ok)
		}
		if got, err := digest.FunctionFromProto(tc.fn.Proto()); err != nil || got != tc.fn {
			t.Errorf("FunctionFromProto(%v.Proto()) = %v, %v", tc.fn, got, err)
		}
		if got := tc.fn.New().Size(); got != digest.HashSize {
			t.Errorf("%v.New().Size() = %d, want %d", tc.fn, got, digest.HashSize)
		}
	}
	for _, name := range []string{"", "SHA256", "BLAKE3", "md5", "sha1", "sha-256", "blake3 "} {
		if f, ok := digest.FunctionFromName(name); ok {
			t.Errorf("FunctionFromName(%q) = %v, true; want false", name, f)
		}
	}
	if got := digest.Function(0).String(); got != "unknown(0)" {
		t.Errorf("Function(0).String() = %q", got)
	}
	if got := digest.Function(0).Proto(); got != repb.DigestFunction_UNKNOWN {
		t.Errorf("Function(0).Proto() = %v", got)
	}
	if len(digest.Functions) != 2 || digest.Functions[0] != digest.SHA256 || digest.Functions[1] != digest.BLAKE3 {
		t.Errorf("Functions = %v", digest.Functions)
	}
}

func TestStringAndSprint(t *testing.T) {
	s := digest.Compute(digest.SHA256, []byte("abc"))
	b := digest.Compute(digest.BLAKE3, []byte("abc"))
	if got, want := s.String(), sha256ABC+"/3"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if got, want := b.String(), "blake3/"+blake3ABC+"/3"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if got, want := s.Sprint(), "sha256:"+sha256ABC+"/3"; got != want {
		t.Errorf("Sprint() = %q, want %q", got, want)
	}
	if got, want := b.Sprint(), "blake3:"+blake3ABC+"/3"; got != want {
		t.Errorf("Sprint() = %q, want %q", got, want)
	}
}

func TestDigestAsMapKey(t *testing.T) {
	m := map[digest.Digest]int{}
	m[digest.Compute(digest.SHA256, []byte("abc"))]++
	m[mustParse(t, digest.SHA256, sha256ABC, 3)]++
	m[mustParse(t, digest.SHA256, sha256ABC, 4)]++
	m[mustParse(t, digest.BLAKE3, sha256ABC, 3)]++
	if len(m) != 3 || m[digest.Compute(digest.SHA256, []byte("abc"))] != 2 {
		t.Errorf("map = %v", m)
	}
}

func TestVerify(t *testing.T) {
	for _, fn := range digest.Functions {
		d := digest.Compute(fn, []byte("abc"))
		if err := d.Verify([]byte("abc")); err != nil {
			t.Errorf("%v: Verify(correct data) = %v", fn, err)
		}
		wantInvalid(t, d.Verify([]byte("abd")), "digest mismatch", d.String(), digest.Compute(fn, []byte("abd")).String())
		wantInvalid(t, d.Verify([]byte("ab")), "digest mismatch", d.String())
		wantInvalid(t, d.Verify(nil), "digest mismatch", digest.Empty(fn).String())
	}
}

func TestMismatchError(t *testing.T) {
	want := digest.Compute(digest.SHA256, []byte("a"))
	got := digest.Compute(digest.SHA256, []byte("b"))
	wantInvalid(t, digest.MismatchError(want, got), "expected "+want.String(), "got "+got.String())
}

// readers returns variants of a reader over data that deliver it in
// different chunkings.
func readers(data []byte) map[string]func() io.Reader {
	return map[string]func() io.Reader{
		"whole":   func() io.Reader { return bytes.NewReader(data) },
		"onebyte": func() io.Reader { return iotest.OneByteReader(bytes.NewReader(data)) },
		"dataerr": func() io.Reader { return iotest.DataErrReader(bytes.NewReader(data)) },
		"half":    func() io.Reader { return iotest.HalfReader(bytes.NewReader(data)) },
	}
}

func TestVerifyingReader(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789abcdef"), 4096+3) // several hasher blocks
	for _, fn := range digest.Functions {
		for _, data := range [][]byte{nil, []byte("abc"), big} {
			d := digest.Compute(fn, data)
			for rname, mk := range readers(data) {
				t.Run(fn.String()+"/"+rname, func(t *testing.T) {
					vr := digest.NewVerifyingReader(mk(), d)
					got, err := io.ReadAll(vr)
					if err != nil {
						t.Fatalf("ReadAll: %v", err)
					}
					if !bytes.Equal(got, data) {
						t.Fatalf("ReadAll returned %d bytes, want %d", len(got), len(data))
					}
					// EOF is sticky.
					if n, err := vr.Read(make([]byte, 4)); n != 0 || err != io.EOF {
						t.Errorf("Read after EOF = %d, %v; want 0, EOF", n, err)
					}
				})
			}
		}
	}
}

func TestVerifyingReaderIOTest(t *testing.T) {
	data := bytes.Repeat([]byte("tvix"), 1000)
	for _, fn := range digest.Functions {
		if err := iotest.TestReader(digest.NewVerifyingReader(bytes.NewReader(data), digest.Compute(fn, data)), data); err != nil {
			t.Errorf("%v: %v", fn, err)
		}
	}
}

func TestVerifyingReaderErrors(t *testing.T) {
	data := []byte("hello, world")
	for _, fn := range digest.Functions {
		d := digest.Compute(fn, data)
		for _, tc := range []struct {
			name string
			body []byte
			want []string
		}{
			{"short", data[:len(data)-1], []string{"received 11 bytes, expected 12"}},
			{"empty", nil, []string{"received 0 bytes, expected 12"}},
			{"long", append(append([]byte{}, data...), '!'), []string{"more than 12 bytes"}},
			{"much longer", bytes.Repeat(data, 100), []string{"more than 12 bytes"}},
			{"wrong hash", []byte("hello, World"), []string{"digest mismatch", d.String(), digest.Compute(fn, []byte("hello, World")).String()}},
		} {
			for rname, mk := range readers(tc.body) {
				t.Run(fn.String()+"/"+tc.name+"/"+rname, func(t *testing.T) {
					vr := digest.NewVerifyingReader(mk(), d)
					got, err := io.ReadAll(vr)
					if err == nil {
						t.Fatalf("ReadAll succeeded with %d bytes; want InvalidArgument", len(got))
					}
					wantInvalid(t, err, tc.want...)
					if len(got) > len(data) {
						t.Errorf("reader yielded %d bytes, more than the digest's size %d", len(got), len(data))
					}
					// The error is sticky and is never replaced by EOF.
					for i := 0; i < 3; i++ {
						n, err2 := vr.Read(make([]byte, 16))
						if n != 0 || err2 == nil || err2 == io.EOF || status.Code(err2) != codes.InvalidArgument {
							t.Fatalf("Read after error = %d, %v; want 0, InvalidArgument", n, err2)
						}
					}
				})
			}
		}
	}
}

func TestVerifyingReaderWrongSizeDigest(t *testing.T) {
	// Correct hash but the digest claims a different size.
	data := []byte("abc")
	d := mustParse(t, digest.SHA256, sha256ABC, 4)
	_, err := io.ReadAll(digest.NewVerifyingReader(bytes.NewReader(data), d))
	wantInvalid(t, err, "received 3 bytes, expected 4")
	d = mustParse(t, digest.BLAKE3, blake3ABC, 2)
	_, err = io.ReadAll(digest.NewVerifyingReader(bytes.NewReader(data), d))
	wantInvalid(t, err, "more than 2 bytes")
}

func TestVerifyingReaderPropagatesErrors(t *testing.T) {
	boom := errors.New("boom")
	data := []byte("abc")
	d := digest.Compute(digest.SHA256, data)
	r := io.MultiReader(bytes.NewReader(data[:2]), iotest.ErrReader(boom))
	vr := digest.NewVerifyingReader(r, d)
	got, err := io.ReadAll(vr)
	if !errors.Is(err, boom) {
		t.Fatalf("ReadAll error = %v, want %v", err, boom)
	}
	if string(got) != "ab" {
		t.Errorf("ReadAll returned %q before the error, want %q", got, "ab")
	}
	if _, err := vr.Read(make([]byte, 1)); !errors.Is(err, boom) {
		t.Errorf("Read after error = %v, want sticky %v", err, boom)
	}
}

func TestVerifyingReaderTimeout(t *testing.T) {
	// A transient (0, ErrTimeout) from the source is passed through; it is not
	// an EOF and must not trigger verification.
	data := []byte("abc")
	d := digest.Compute(digest.BLAKE3, data)
	vr := digest.NewVerifyingReader(iotest.TimeoutReader(bytes.NewReader(data)), d)
	buf := make([]byte, 8)
	n, err := vr.Read(buf)
	if n != 3 || err != nil {
		t.Fatalf("first Read = %d, %v", n, err)
	}
	if _, err := vr.Read(buf); !errors.Is(err, iotest.ErrTimeout) {
		t.Fatalf("second Read error = %v, want ErrTimeout", err)
	}
}
