package digest

import (
	"strconv"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// MaxResourceNameLength bounds the resource names tvixfarm accepts.
const MaxResourceNameLength = 4096

// ResourceName is a parsed ByteStream resource name:
//
//	{instance}/blobs/{digest_function/}{hash}/{size}
//	{instance}/compressed-blobs/{compressor}/{digest_function/}{hash}/{size}
//	{instance}/uploads/{uuid}/blobs/{digest_function/}{hash}/{size}{/metadata}
//	{instance}/uploads/{uuid}/compressed-blobs/{compressor}/{digest_function/}{hash}/{size}{/metadata}
type ResourceName struct {
	Instance   string
	UploadID   string // only for write resource names
	Compressor repb.Compressor_Value
	Digest     Digest
}

// reserved are the path segments an instance name may not contain.
var reserved = map[string]bool{
	"blobs": true, "uploads": true, "actions": true, "actionResults": true,
	"operations": true, "capabilities": true, "compressed-blobs": true,
}

// ValidateInstanceName checks an instance name: empty, or slash-separated
// non-empty segments that are neither "." nor ".." nor REAPI's reserved
// keywords.
func ValidateInstanceName(name string) error {
	if name == "" {
		return nil
	}
	if len(name) > MaxResourceNameLength {
		return status.Errorf(codes.InvalidArgument, "instance name is longer than %d bytes", MaxResourceNameLength)
	}
	for _, seg := range strings.Split(name, "/") {
		if err := checkInstanceSegment(seg); err != nil {
			return err
		}
	}
	return nil
}

func checkInstanceSegment(seg string) error {
	switch {
	case seg == "":
		return status.Error(codes.InvalidArgument, "instance name has an empty path segment")
	case seg == "." || seg == "..":
		return status.Errorf(codes.InvalidArgument, "instance name contains %q", seg)
	case reserved[seg]:
		return status.Errorf(codes.InvalidArgument, "instance name contains the reserved keyword %q", seg)
	case strings.ContainsRune(seg, 0):
		return status.Error(codes.InvalidArgument, "instance name contains a NUL byte")
	}
	return nil
}

// ParseReadResourceName parses a ByteStream Read resource name.
func ParseReadResourceName(name string) (ResourceName, error) {
	segs, i, err := split(name)
	if err != nil {
		return ResourceName{}, err
	}
	rn := ResourceName{Instance: strings.Join(segs[:i], "/")}
	rest, err := rn.parseBlob(segs[i:])
	if err != nil {
		return ResourceName{}, status.Errorf(codes.InvalidArgument, "resource name %q: %s", truncate(name), status.Convert(err).Message())
	}
	if len(rest) != 0 {
		return ResourceName{}, status.Errorf(codes.InvalidArgument, "resource name %q: unexpected trailing segments after the size", truncate(name))
	}
	return rn, nil
}

// ParseWriteResourceName parses a ByteStream Write resource name.
func ParseWriteResourceName(name string) (ResourceName, error) {
	segs, i, err := split(name)
	if err != nil {
		return ResourceName{}, err
	}
	if segs[i] != "uploads" {
		return ResourceName{}, status.Errorf(codes.InvalidArgument, "resource name %q: a write resource name needs \"uploads/{uuid}/\" before the blob", truncate(name))
	}
	if len(segs) < i+3 || segs[i+1] == "" || segs[i+1] == "." || segs[i+1] == ".." || len(segs[i+1]) > 128 {
		return ResourceName{}, status.Errorf(codes.InvalidArgument, "resource name %q: missing or invalid upload id", truncate(name))
	}
	rn := ResourceName{Instance: strings.Join(segs[:i], "/"), UploadID: segs[i+1]}
	// Anything after the size is optional metadata, which is ignored.
	if _, err := rn.parseBlob(segs[i+2:]); err != nil {
		return ResourceName{}, status.Errorf(codes.InvalidArgument, "resource name %q: %s", truncate(name), status.Convert(err).Message())
	}
	return rn, nil
}

// split splits name into segments and returns the index of the first
// keyword segment ("blobs", "compressed-blobs" or "uploads"), validating the
// instance name segments before it.
func split(name string) ([]string, int, error) {
	if len(name) > MaxResourceNameLength {
		return nil, 0, status.Errorf(codes.InvalidArgument, "resource name is longer than %d bytes", MaxResourceNameLength)
	}
	segs := strings.Split(name, "/")
	for i, seg := range segs {
		switch seg {
		case "blobs", "compressed-blobs", "uploads":
			return segs, i, nil
		}
		if err := checkInstanceSegment(seg); err != nil {
			return nil, 0, status.Errorf(codes.InvalidArgument, "resource name %q: %s", truncate(name), status.Convert(err).Message())
		}
	}
	return nil, 0, status.Errorf(codes.InvalidArgument, "resource name %q has no \"blobs\", \"compressed-blobs\" or \"uploads\" segment", truncate(name))
}

// parseBlob parses "blobs/{fn/}{hash}/{size}" or
// "compressed-blobs/{compressor}/{fn/}{hash}/{size}" and returns the
// segments that follow.
func (rn *ResourceName) parseBlob(segs []string) ([]string, error) {
	if len(segs) == 0 {
		return nil, status.Error(codes.InvalidArgument, "missing blob")
	}
	switch segs[0] {
	case "blobs":
		rn.Compressor = repb.Compressor_IDENTITY
		segs = segs[1:]
	case "compressed-blobs":
		if len(segs) < 2 {
			return nil, status.Error(codes.InvalidArgument, "missing compressor")
		}
		switch segs[1] {
		case "zstd":
			rn.Compressor = repb.Compressor_ZSTD
		default:
			return nil, status.Errorf(codes.InvalidArgument, "compressor %q is not supported (supported: zstd)", truncate(segs[1]))
		}
		segs = segs[2:]
	default:
		return nil, status.Errorf(codes.InvalidArgument, "expected \"blobs\" or \"compressed-blobs\", got %q", truncate(segs[0]))
	}
	fn := SHA256
	if len(segs) > 0 {
		if f, ok := FunctionFromName(segs[0]); ok {
			fn = f
			segs = segs[1:]
		}
	}
	if len(segs) < 2 {
		return nil, status.Error(codes.InvalidArgument, "expected {hash}/{size}")
	}
	size, err := parseSize(segs[1])
	if err != nil {
		return nil, err
	}
	d, err := Parse(fn, segs[0], size)
	if err != nil {
		return nil, err
	}
	rn.Digest = d
	return segs[2:], nil
}

func parseSize(s string) (int64, error) {
	if s == "" || len(s) > 19 {
		return 0, status.Errorf(codes.InvalidArgument, "invalid size %q", truncate(s))
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, status.Errorf(codes.InvalidArgument, "invalid size %q: not a non-negative decimal number", truncate(s))
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, status.Errorf(codes.InvalidArgument, "invalid size %q: %v", truncate(s), err)
	}
	return n, nil
}

// ReadName returns the canonical read resource name of d in instance.
func ReadName(instance string, d Digest, c repb.Compressor_Value) string {
	var b strings.Builder
	if instance != "" {
		b.WriteString(instance)
		b.WriteByte('/')
	}
	if c == repb.Compressor_ZSTD {
		b.WriteString("compressed-blobs/zstd/")
	} else {
		b.WriteString("blobs/")
	}
	b.WriteString(d.String())
	return b.String()
}

// WriteName returns the canonical write resource name of d in instance.
func WriteName(instance, uploadID string, d Digest, c repb.Compressor_Value) string {
	prefix := "uploads/" + uploadID + "/"
	if instance != "" {
		prefix = instance + "/" + prefix
	}
	return prefix + ReadName("", d, c)
}
