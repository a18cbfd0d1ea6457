// Package binarycache serves the farm's store to Nix over HTTP, as a
// binary cache (the protocol of `nix copy --from http://…` and
// `substituters = http://…`), from the path-info store and the CAS:
//
//	GET|HEAD /nix-cache-info           StoreDir, WantMassQuery, Priority
//	GET|HEAD /<hash>.narinfo           the path info of the store path with that hash part
//	GET|HEAD /nar/<hash>-<narhash>.nar its NAR, uncompressed, streamed from the CAS
//	GET|HEAD /log/<name>.drv           the build log of a derivation the farm built
//
// <hash> is the 32-character hash part of a store path and <narhash> the
// nixbase32 SHA-256 of its NAR: a NAR URL names the path and the NAR it
// expects, so a URL from a stale narinfo is a 404, never another NAR.
// Narinfos carry the signatures the store holds, plus one by the farm's
// key when it has one. Unknown paths are 404, malformed names 400, and
// failures of the store 5xx (Nix then gives the cache a rest).
package binarycache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"

	"github.com/nix-community/go-nix/pkg/narinfo"
	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/nixhash"
	"github.com/nix-community/go-nix/pkg/storepath"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/coordinator"
	"tvixfarm/frontend/nar"
	"tvixfarm/frontend/pathinfo"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

// DefaultPriority is the priority announced when Options gives none.
const DefaultPriority = 40

// Options configure a Handler.
type Options struct {
	// Key, if not nil, signs every narinfo served.
	Key *signature.SecretKey
	// Priority and WantMassQuery are announced in /nix-cache-info.
	Priority      int
	WantMassQuery bool
	// Logger receives failures (and requests, at debug level).
	Logger *slog.Logger
}

// Handler is the binary cache's http.Handler.
type Handler struct {
	paths     pathinfo.Store
	cas       blobstore.BlobAccess
	key       *signature.SecretKey
	log       *slog.Logger
	cacheInfo string
}

// New returns a Handler serving paths, with NARs and logs read from cas.
func New(paths pathinfo.Store, cas blobstore.BlobAccess, opts Options) *Handler {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	wmq := 0
	if opts.WantMassQuery {
		wmq = 1
	}
	return &Handler{
		paths: paths, cas: cas, key: opts.Key, log: log,
		cacheInfo: fmt.Sprintf("StoreDir: %s\nWantMassQuery: %d\nPriority: %d\n", storepath.StoreDir, wmq, opts.Priority),
	}
}

var (
	requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "tvixfarm", Subsystem: "binary_cache", Name: "requests_total",
		Help: "Binary cache requests, by kind (cache_info, narinfo, nar, log, other) and HTTP status.",
	}, []string{"kind", "code"})
	narBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "tvixfarm", Subsystem: "binary_cache", Name: "nar_bytes_total",
		Help: "NAR bytes sent by the binary cache.",
	})
)

func init() { prometheus.MustRegister(requests, narBytes) }

// httpError is an error with the HTTP status it is answered with.
type httpError struct {
	code int
	msg  string
}

func (e *httpError) Error() string { return e.msg }

func errorf(code int, format string, args ...any) error {
	return &httpError{code: code, msg: fmt.Sprintf(format, args...)}
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	name := strings.TrimPrefix(r.URL.Path, "/")
	kind, serve := h.route(name)
	rec := &recorder{ResponseWriter: w}
	var err error
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		err = errorf(http.StatusMethodNotAllowed, "method %s not allowed: the binary cache is read-only", r.Method)
	} else {
		err = serve(rec, r, name)
	}
	if err != nil {
		code := httpCode(err)
		if r.Context().Err() != nil {
			code = 499 // the client went away (or the server is stopping)
		}
		if code >= 500 {
			h.log.Warn("binary cache", "method", r.Method, "path", r.URL.Path, "code", code, "err", err)
		}
		if rec.wrote {
			// The body has begun: all a client can be told is that
			// it is incomplete (a body shorter than Content-Length).
			requests.WithLabelValues(kind, "aborted").Inc()
			panic(http.ErrAbortHandler)
		}
		rec.Header().Del("Content-Length")
		rec.Header().Del("Cache-Control")
		http.Error(rec, err.Error(), code)
	}
	if rec.code == 0 {
		rec.code = http.StatusOK
	}
	requests.WithLabelValues(kind, strconv.Itoa(rec.code)).Inc()
	h.log.Debug("binary cache", "method", r.Method, "path", r.URL.Path, "code", rec.code, "bytes", rec.n)
}

// route returns the kind of request name is and its handler.
func (h *Handler) route(name string) (string, func(http.ResponseWriter, *http.Request, string) error) {
	switch {
	case name == "nix-cache-info":
		return "cache_info", h.serveCacheInfo
	case strings.HasSuffix(name, ".narinfo") && !strings.Contains(name, "/"):
		return "narinfo", h.serveNarInfo
	case strings.HasPrefix(name, "nar/"):
		return "nar", h.serveNar
	case strings.HasPrefix(name, "log/"):
		return "log", h.serveLog
	}
	return "other", func(http.ResponseWriter, *http.Request, string) error {
		return errorf(http.StatusNotFound, "not found")
	}
}

// recorder records the status and whether the body has begun.
type recorder struct {
	http.ResponseWriter
	code  int
	wrote bool
	n     int64
}

func (r *recorder) WriteHeader(code int) {
	if r.code == 0 {
		r.code = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(p []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	r.wrote = r.wrote || len(p) > 0
	n, err := r.ResponseWriter.Write(p)
	r.n += int64(n)
	return n, err
}

// httpCode maps an error (an httpError or a gRPC status) to an HTTP
// status.
func httpCode(err error) int {
	var he *httpError
	if errors.As(err, &he) {
		return he.code
	}
	if errors.Is(err, context.Canceled) {
		return 499 // the client went away; nobody reads this
	}
	switch status.Code(err) {
	case codes.NotFound:
		return http.StatusNotFound
	case codes.InvalidArgument:
		return http.StatusBadRequest
	case codes.Unavailable, codes.ResourceExhausted, codes.Aborted:
		return http.StatusServiceUnavailable
	case codes.DeadlineExceeded:
		return http.StatusGatewayTimeout
	case codes.Canceled:
		return 499
	}
	return http.StatusInternalServerError
}

func (h *Handler) serveCacheInfo(w http.ResponseWriter, r *http.Request, _ string) error {
	w.Header().Set("Content-Type", "text/x-nix-cache-info")
	return writeString(w, r, h.cacheInfo)
}

// writeString answers with s (headers only for HEAD).
func writeString(w http.ResponseWriter, r *http.Request, s string) error {
	w.Header().Set("Content-Length", strconv.Itoa(len(s)))
	if r.Method == http.MethodHead {
		w.WriteHeader(http.StatusOK)
		return nil
	}
	_, err := io.WriteString(w, s)
	return err
}

// validHash reports whether s is a store path hash part.
func validHash(s string) bool {
	return len(s) == nixbase32.EncodedLen(storepath.PathHashSize) && strings.Trim(s, nixbase32.Alphabet) == ""
}

func (h *Handler) serveNarInfo(w http.ResponseWriter, r *http.Request, name string) error {
	hash := strings.TrimSuffix(name, ".narinfo")
	if !validHash(hash) {
		return errorf(http.StatusBadRequest, "%q is not <store path hash>.narinfo", name)
	}
	info, err := h.paths.GetByHash(r.Context(), hash)
	if err != nil {
		return err
	}
	ni, err := NarInfo(info, h.key)
	if err != nil {
		return fmt.Errorf("%s: %w", info.StorePath, err)
	}
	w.Header().Set("Content-Type", ni.ContentType())
	return writeString(w, r, ni.String())
}

// NarURL is the URL of info's NAR, relative to the cache:
// nar/<hash part>-<nixbase32 NAR SHA-256>.nar.
func NarURL(info *storepb.PathInfo) string {
	return "nar/" + pathinfo.HashPart(info.StorePath) + "-" + nixbase32.EncodeToString(info.NarSha256) + ".nar"
}

// NarInfo renders info as a narinfo of an uncompressed NAR at NarURL,
// with info's signatures (malformed ones dropped) and, if key is not nil,
// one by key over Nix's fingerprint "1;<path>;sha256:<nix32 NAR
// hash>;<NAR size>;<references, comma-separated>", which replaces any
// signature by a key of the same name.
func NarInfo(info *storepb.PathInfo, key *signature.SecretKey) (*narinfo.NarInfo, error) {
	if err := pathinfo.Validate(info); err != nil {
		return nil, err
	}
	narHash, err := nixhash.NewHashWithEncoding(nixhash.SHA256, info.NarSha256, nixhash.NixBase32, true)
	if err != nil {
		return nil, err
	}
	ni := &narinfo.NarInfo{
		StorePath:   info.StorePath,
		URL:         NarURL(info),
		Compression: "none",
		FileHash:    narHash,
		FileSize:    info.NarSize,
		NarHash:     narHash,
		NarSize:     info.NarSize,
		References:  make([]string, len(info.References)),
		CA:          info.Ca,
	}
	for i, ref := range info.References {
		ni.References[i] = baseName(ref)
	}
	if info.Deriver != "" {
		ni.Deriver = baseName(info.Deriver)
	}
	for _, s := range info.Signatures {
		sig, err := signature.ParseSignature(s)
		if err != nil {
			continue
		}
		if key != nil && sig.Name == key.ToPublicKey().Name {
			continue
		}
		ni.Signatures = append(ni.Signatures, sig)
	}
	if key != nil {
		sig, err := key.Sign(nil, ni.Fingerprint())
		if err != nil {
			return nil, err
		}
		ni.Signatures = append(ni.Signatures, sig)
	}
	return ni, nil
}

func baseName(p string) string { return strings.TrimPrefix(p, storepath.StoreDir+"/") }

// parseNarName splits "nar/<hash>-<narhash>.nar".
func parseNarName(name string) (hash, narHash string, err error) {
	base, ok := strings.CutSuffix(strings.TrimPrefix(name, "nar/"), ".nar")
	hash, narHash, ok2 := strings.Cut(base, "-")
	if !ok || !ok2 || !validHash(hash) || len(narHash) != nixbase32.EncodedLen(32) || strings.Trim(narHash, nixbase32.Alphabet) != "" {
		return "", "", errorf(http.StatusBadRequest, "%q is not nar/<store path hash>-<NAR sha256>.nar", name)
	}
	return hash, narHash, nil
}

func (h *Handler) serveNar(w http.ResponseWriter, r *http.Request, name string) error {
	hash, narHash, err := parseNarName(name)
	if err != nil {
		return err
	}
	ctx := r.Context()
	info, err := h.paths.GetByHash(ctx, hash)
	if err != nil {
		return err
	}
	if nixbase32.EncodeToString(info.NarSha256) != narHash {
		return errorf(http.StatusNotFound, "%s has another NAR now (its narinfo names it)", info.StorePath)
	}
	node, err := coordinator.NarNode(info.Node)
	if err != nil {
		return fmt.Errorf("%s: %w", info.StorePath, err)
	}
	fn, ok := digest.FunctionFromName(info.Node.GetDigestFunction())
	if !ok {
		return fmt.Errorf("%s: unknown digest function %q", info.StorePath, info.Node.GetDigestFunction())
	}
	w.Header().Set("Content-Type", "application/x-nix-nar")
	w.Header().Set("Content-Length", strconv.FormatUint(info.NarSize, 10))
	// The URL names the NAR's hash: its contents never change.
	w.Header().Set("Cache-Control", "public, max-age=31536000, immutable")
	if r.Method == http.MethodHead {
		w.WriteHeader(http.StatusOK)
		return nil
	}
	lw := &limitWriter{w: w, left: info.NarSize}
	err = nar.Write(ctx, h.cas, fn, node, lw)
	narBytes.Add(float64(info.NarSize - lw.left))
	if err == nil && lw.left != 0 {
		err = fmt.Errorf("the NAR is %d bytes shorter than recorded", lw.left)
	}
	if err != nil {
		return fmt.Errorf("%s: NAR: %w", info.StorePath, err)
	}
	return nil
}

// limitWriter passes at most left bytes to w.
type limitWriter struct {
	w    io.Writer
	left uint64
}

var errTooLong = errors.New("the NAR is longer than recorded")

func (l *limitWriter) Write(p []byte) (int, error) {
	if uint64(len(p)) > l.left {
		return 0, errTooLong
	}
	n, err := l.w.Write(p)
	l.left -= uint64(n)
	return n, err
}

// serveLog serves log/<drv basename>, or log/<output basename> (the log
// of the path's deriver).
func (h *Handler) serveLog(w http.ResponseWriter, r *http.Request, name string) error {
	base := strings.TrimPrefix(name, "log/")
	sp, err := storepath.FromString(base)
	if err != nil || strings.Contains(base, "/") {
		return errorf(http.StatusBadRequest, "%q is not log/<store path base name>", name)
	}
	ctx := r.Context()
	drvPath := sp.Absolute()
	if !strings.HasSuffix(base, ".drv") {
		info, err := h.paths.GetByHash(ctx, pathinfo.HashPart(drvPath))
		if err != nil {
			return err
		}
		if info.StorePath != drvPath || info.Deriver == "" {
			return errorf(http.StatusNotFound, "no build log of %s", drvPath)
		}
		drvPath = info.Deriver
	}
	b, err := h.paths.GetBuild(ctx, drvPath)
	if err != nil {
		return err
	}
	if b.Log == nil {
		return errorf(http.StatusNotFound, "the build of %s has no log", drvPath)
	}
	d, err := pathinfo.Digest(b.LogDigestFunction, b.Log)
	if err != nil {
		return fmt.Errorf("build of %s: log: %w", drvPath, err)
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if r.Method == http.MethodHead {
		w.Header().Set("Content-Length", strconv.FormatInt(d.Size(), 10))
		w.WriteHeader(http.StatusOK)
		return nil
	}
	var rd io.ReadCloser
	if d.Size() == 0 {
		rd = io.NopCloser(strings.NewReader(""))
	} else if rd, err = h.cas.Get(ctx, d); err != nil {
		if status.Code(err) == codes.NotFound {
			return errorf(http.StatusNotFound, "the log of %s is no longer in the CAS", drvPath)
		}
		return fmt.Errorf("log of %s: %w", drvPath, err)
	}
	defer rd.Close()
	w.Header().Set("Content-Length", strconv.FormatInt(d.Size(), 10))
	n, err := io.Copy(w, rd)
	if err == nil && n != d.Size() {
		err = fmt.Errorf("%d of %d bytes", n, d.Size())
	}
	if err != nil {
		return fmt.Errorf("log of %s: %w", drvPath, err)
	}
	return nil
}
