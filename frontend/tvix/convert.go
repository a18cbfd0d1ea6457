package tvix

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/castore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/nar"
	"tvixfarm/frontend/pathinfo"
	castorepb "tvixfarm/proto/tvix/castore/v1"
	tvixstorepb "tvixfarm/proto/tvix/store/v1"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

const storeDir = "/nix/store/"

// maxNameLen is the longest name part of a store path basename.
const maxNameLen = 211

// ParseBasename checks a store path basename as Tvix does (32 nixbase32
// characters, '-', a name of 1 to 211 bytes of [A-Za-z0-9+-_?=.]) and
// returns its 20-byte digest and its name.
func ParseBasename(b string) ([]byte, string, error) {
	if len(b) < 34 || b[32] != '-' {
		return nil, "", fmt.Errorf("%q is not a store path basename", b)
	}
	h, err := nixbase32.DecodeString(b[:32])
	if err != nil || len(h) != 20 {
		return nil, "", fmt.Errorf("%q: invalid hash part", b)
	}
	name := b[33:]
	if len(name) > maxNameLen {
		return nil, "", fmt.Errorf("%q: name longer than %d bytes", b, maxNameLen)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("+-_?=.", c) >= 0) {
			return nil, "", fmt.Errorf("%q: invalid character %q in the name", b, c)
		}
	}
	return h, name, nil
}

// Validate checks a PathInfo as Tvix does (§3.3 of the reference): the
// narinfo is present, references are 20 bytes each and match
// reference_names, the node is valid and named by a store path basename,
// the NAR hash is 32 bytes, the deriver is a valid store path, signatures
// are 64 bytes and the CA digest's length matches its type.
func Validate(info *tvixstorepb.PathInfo) error {
	ni := info.GetNarinfo()
	if ni == nil {
		return errors.New("narinfo is missing")
	}
	if len(ni.ReferenceNames) != len(info.References) {
		return fmt.Errorf("%d references but %d reference names", len(info.References), len(ni.ReferenceNames))
	}
	for i, r := range info.References {
		if len(r) != 20 {
			return fmt.Errorf("reference %d: invalid digest length %d", i, len(r))
		}
		h, _, err := ParseBasename(ni.ReferenceNames[i])
		if err != nil {
			return fmt.Errorf("reference name %d: %v", i, err)
		}
		if string(h) != string(r) {
			return fmt.Errorf("reference name %q does not match reference %d", ni.ReferenceNames[i], i)
		}
	}
	if info.Node == nil {
		return errors.New("node is missing")
	}
	if err := castore.ValidateNode(info.Node, false); err != nil {
		return fmt.Errorf("invalid root node: %v", err)
	}
	if _, _, err := ParseBasename(string(castore.NodeName(info.Node))); err != nil {
		return fmt.Errorf("invalid root node name: %v", err)
	}
	if len(ni.NarSha256) != 32 {
		return fmt.Errorf("invalid NAR SHA-256 length %d", len(ni.NarSha256))
	}
	if dv := ni.Deriver; dv != nil {
		if len(dv.Digest) != 20 {
			return fmt.Errorf("deriver: invalid digest length %d", len(dv.Digest))
		}
		if _, _, err := ParseBasename(nixbase32.EncodeToString(dv.Digest) + "-" + dv.Name); err != nil {
			return fmt.Errorf("deriver: %v", err)
		}
	}
	for i, s := range ni.Signatures {
		if len(s.Data) != 64 {
			return fmt.Errorf("signature %d: %d bytes, want 64", i, len(s.Data))
		}
	}
	if ca := ni.Ca; ca != nil {
		a, ok := caAlgos[ca.Type]
		if !ok {
			return fmt.Errorf("unknown CA hash type %d", ca.Type)
		}
		if len(ca.Digest) != a.size {
			return fmt.Errorf("CA digest of %d bytes, want %d for %s", len(ca.Digest), a.size, a.algo)
		}
	}
	return nil
}

type caAlgo struct {
	prefix, algo string
	size         int
}

var caAlgos = map[tvixstorepb.NARInfo_CA_Hash]caAlgo{
	tvixstorepb.NARInfo_CA_NAR_SHA256:  {"fixed:r:", "sha256", 32},
	tvixstorepb.NARInfo_CA_NAR_SHA1:    {"fixed:r:", "sha1", 20},
	tvixstorepb.NARInfo_CA_NAR_SHA512:  {"fixed:r:", "sha512", 64},
	tvixstorepb.NARInfo_CA_NAR_MD5:     {"fixed:r:", "md5", 16},
	tvixstorepb.NARInfo_CA_TEXT_SHA256: {"text:", "sha256", 32},
	tvixstorepb.NARInfo_CA_FLAT_SHA1:   {"fixed:", "sha1", 20},
	tvixstorepb.NARInfo_CA_FLAT_MD5:    {"fixed:", "md5", 16},
	tvixstorepb.NARInfo_CA_FLAT_SHA256: {"fixed:", "sha256", 32},
	tvixstorepb.NARInfo_CA_FLAT_SHA512: {"fixed:", "sha512", 64},
}

// formatCA renders a CA as Nix writes it in narinfo files.
func formatCA(ca *tvixstorepb.NARInfo_CA) string {
	a := caAlgos[ca.Type]
	return a.prefix + a.algo + ":" + nixbase32.EncodeToString(ca.Digest)
}

// parseCA parses a narinfo CA ("fixed:r:sha256:…", "text:sha256:…"); the
// hash may be nixbase32, hex or base64.
func parseCA(s string) (*tvixstorepb.NARInfo_CA, error) {
	for t, a := range caAlgos {
		p := a.prefix + a.algo + ":"
		if !strings.HasPrefix(s, p) {
			continue
		}
		h := s[len(p):]
		var raw []byte
		var err error
		switch len(h) {
		case nixbase32.EncodedLen(a.size):
			raw, err = nixbase32.DecodeString(h)
		case hex.EncodedLen(a.size):
			raw, err = hex.DecodeString(h)
		default:
			raw, err = base64.StdEncoding.DecodeString(h)
		}
		if err != nil || len(raw) != a.size {
			return nil, fmt.Errorf("CA %q: invalid hash", s)
		}
		return &tvixstorepb.NARInfo_CA{Type: t, Digest: raw}, nil
	}
	return nil, fmt.Errorf("CA %q: unknown kind", s)
}

// rootOf returns the castore node (anonymous) of a farm path info: the one
// recorded, or one derived from its REAPI node.
func (s *Service) rootOf(ctx context.Context, info *storepb.PathInfo) (*castorepb.Node, error) {
	if info.Castore != nil && castore.ValidateNode(info.Castore, true) == nil {
		return info.Castore, nil
	}
	n := info.Node
	switch n.GetKind() {
	case storepb.Node_SYMLINK:
		return &castorepb.Node{Node: &castorepb.Node_Symlink{Symlink: &castorepb.SymlinkNode{Target: []byte(n.Target)}}}, nil
	case storepb.Node_FILE, storepb.Node_DIRECTORY:
		d, _, err := pathinfo.NodeDigest(n)
		if err != nil {
			return nil, status.Errorf(codes.DataLoss, "%s: %v", info.StorePath, err)
		}
		if d.Function() != digest.BLAKE3 {
			return nil, status.Errorf(codes.FailedPrecondition, "%s is stored with %s digests; castore needs BLAKE3", info.StorePath, d.Function())
		}
		h := d.Hash()
		if n.Kind == storepb.Node_FILE {
			return &castorepb.Node{Node: &castorepb.Node_File{File: &castorepb.FileNode{Digest: h[:], Size: uint64(d.Size()), Executable: n.Executable}}}, nil
		}
		ch, size, err := s.st.FromREAPI(ctx, d)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", info.StorePath, err)
		}
		return &castorepb.Node{Node: &castorepb.Node_Directory{Directory: &castorepb.DirectoryNode{Digest: ch[:], Size: size}}}, nil
	}
	return nil, status.Errorf(codes.DataLoss, "%s: node of unknown kind %v", info.StorePath, n.GetKind())
}

// ToTvix converts a farm path info into Tvix's form.
func (s *Service) ToTvix(ctx context.Context, info *storepb.PathInfo) (*tvixstorepb.PathInfo, error) {
	root, err := s.rootOf(ctx, info)
	if err != nil {
		return nil, err
	}
	base := strings.TrimPrefix(info.StorePath, storeDir)
	ni := &tvixstorepb.NARInfo{NarSize: info.NarSize, NarSha256: info.NarSha256}
	out := &tvixstorepb.PathInfo{Node: castore.WithName(root, []byte(base)), Narinfo: ni}
	for _, r := range info.References {
		rb := strings.TrimPrefix(r, storeDir)
		h, _, err := ParseBasename(rb)
		if err != nil {
			return nil, status.Errorf(codes.DataLoss, "%s: reference %v", info.StorePath, err)
		}
		out.References = append(out.References, h)
		ni.ReferenceNames = append(ni.ReferenceNames, rb)
	}
	for _, sig := range info.Signatures {
		name, data, ok := strings.Cut(sig, ":")
		raw, err := base64.StdEncoding.DecodeString(data)
		if !ok || err != nil || len(raw) != 64 {
			continue // not an ed25519 signature Tvix can carry
		}
		ni.Signatures = append(ni.Signatures, &tvixstorepb.NARInfo_Signature{Name: name, Data: raw})
	}
	if info.Deriver != "" {
		h, name, err := ParseBasename(strings.TrimPrefix(info.Deriver, storeDir))
		if err == nil {
			ni.Deriver = &tvixstorepb.StorePath{Name: strings.TrimSuffix(name, ".drv"), Digest: h}
		}
	}
	if info.Ca != "" {
		if ca, err := parseCA(info.Ca); err == nil {
			ni.Ca = ca
		}
	}
	return out, nil
}

// fromTvix converts a valid Tvix path info into the farm's form, mapping
// its castore tree to a REAPI tree. narNode is the tree for NAR rendering.
func (s *Service) fromTvix(ctx context.Context, in *tvixstorepb.PathInfo) (*storepb.PathInfo, nar.Node, error) {
	base := string(castore.NodeName(in.Node))
	anon := castore.WithName(in.Node, nil)
	nn, err := s.narNode(ctx, anon)
	if err != nil {
		return nil, nar.Node{}, err
	}
	ni := in.Narinfo
	info := &storepb.PathInfo{
		StorePath: storeDir + base,
		NarSha256: ni.NarSha256,
		NarSize:   ni.NarSize,
		Castore:   anon,
	}
	switch nn.Type {
	case nar.Directory:
		info.Node = &storepb.Node{Kind: storepb.Node_DIRECTORY, DigestFunction: digest.BLAKE3.String(), Digest: pathinfo.DigestProto(nn.Digest)}
	case nar.Regular:
		info.Node = &storepb.Node{Kind: storepb.Node_FILE, DigestFunction: digest.BLAKE3.String(), Digest: pathinfo.DigestProto(nn.Digest), Executable: nn.Executable}
	default:
		info.Node = &storepb.Node{Kind: storepb.Node_SYMLINK, DigestFunction: digest.BLAKE3.String(), Target: nn.Target}
	}
	for _, r := range ni.ReferenceNames {
		info.References = append(info.References, storeDir+r)
	}
	slices.Sort(info.References)
	info.References = slices.Compact(info.References)
	for _, sig := range ni.Signatures {
		info.Signatures = append(info.Signatures, sig.Name+":"+base64.StdEncoding.EncodeToString(sig.Data))
	}
	if dv := ni.Deriver; dv != nil {
		info.Deriver = storeDir + nixbase32.EncodeToString(dv.Digest) + "-" + dv.Name + ".drv"
	}
	if ni.Ca != nil {
		info.Ca = formatCA(ni.Ca)
	}
	return info, nn, nil
}

// narNode maps an anonymous castore node to the REAPI node NARs are
// rendered from.
func (s *Service) narNode(ctx context.Context, n *castorepb.Node) (nar.Node, error) {
	switch {
	case n.GetDirectory() != nil:
		d, err := s.st.ToREAPI(ctx, [castore.DigestLen]byte(n.GetDirectory().Digest))
		if err != nil {
			return nar.Node{}, err
		}
		return nar.DirectoryNode(d), nil
	case n.GetFile() != nil:
		f := n.GetFile()
		return nar.FileNode(digest.New(digest.BLAKE3, [castore.DigestLen]byte(f.Digest), int64(f.Size)), f.Executable), nil
	case n.GetSymlink() != nil:
		return nar.SymlinkNode(string(n.GetSymlink().Target)), nil
	}
	return nar.Node{}, status.Error(codes.InvalidArgument, "no node set")
}
