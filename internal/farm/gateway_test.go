package farm

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/internal/config"
	adminpb "tvixfarm/proto/tvixfarm/admin/v1"
)

// capsRecorder answers GetCapabilities and records the request's
// metadata.
type capsRecorder struct {
	repb.UnimplementedCapabilitiesServer
	md chan metadata.MD
}

func (c *capsRecorder) GetCapabilities(ctx context.Context, _ *repb.GetCapabilitiesRequest) (*repb.ServerCapabilities, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	c.md <- md
	return &repb.ServerCapabilities{}, nil
}

// selfSigned writes a certificate for 127.0.0.1 named "remote.test" and
// its key into dir.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "remote.test"},
		DNSNames: []string{"remote.test"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, IsCA: true, BasicConstraintsValid: true,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
	return certFile, keyFile
}

// TestRemoteDialOptions: the connection to a remote backend uses TLS with
// the configured CA and server name, and sends the configured headers,
// those from files included, on every call.
func TestRemoteDialOptions(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := selfSigned(t, dir)
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	rec := &capsRecorder{md: make(chan metadata.MD, 1)}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}})))
	repb.RegisterCapabilitiesServer(srv, rec)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	defer srv.Stop()
	tok := filepath.Join(dir, "bearer")
	os.WriteFile(tok, []byte("Bearer s3cret\n"), 0o600)
	r := &config.Remote{
		Address:     lis.Addr().String(),
		TLS:         &config.TLS{CAFile: certFile, ServerName: "remote.test"},
		Headers:     map[string]string{"x-team": "nix"},
		HeaderFiles: map[string]string{"authorization": tok},
	}
	opts, err := remoteDialOptions(r)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(r.Address, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := repb.NewCapabilitiesClient(conn).GetCapabilities(ctx, &repb.GetCapabilitiesRequest{}); err != nil {
		t.Fatal(err)
	}
	md := <-rec.md
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer s3cret" {
		t.Errorf("authorization = %v", got)
	}
	if got := md.Get("x-team"); len(got) != 1 || got[0] != "nix" {
		t.Errorf("x-team = %v", got)
	}

	// The wrong server name fails the handshake.
	r.TLS.ServerName = "other.test"
	opts, _ = remoteDialOptions(r)
	bad, _ := grpc.NewClient(r.Address, opts...)
	defer bad.Close()
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer scancel()
	if _, err := repb.NewCapabilitiesClient(bad).GetCapabilities(sctx, &repb.GetCapabilitiesRequest{}); err == nil {
		t.Error("a certificate for another name was accepted")
	}
}

// TestGatewayNeedsStorage: gateway mode without the storage role is
// refused at start, and a remote that does not answer fails the start
// with an error naming it.
func TestGatewayStartErrors(t *testing.T) {
	cfg := config.Default()
	cfg.Data = t.TempDir()
	cfg.Listen = "127.0.0.1:0"
	noHTTP := ""
	cfg.BinaryCache.Listen = &noHTTP
	cfg.Execution = config.Execution{Backend: config.BackendRemote, Remote: &config.Remote{Address: "127.0.0.1:1", RPCTimeout: config.Duration(time.Second)}}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	cfg.Role = "scheduler"
	if _, err := New(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil))); err == nil || !strings.Contains(err.Error(), "storage role") {
		t.Errorf("scheduler role alone: %v", err)
	}
	cfg.Role = "all"
	if _, err := New(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil))); err == nil || !strings.Contains(err.Error(), "remote execution backend 127.0.0.1:1") {
		t.Errorf("unreachable remote: %v", err)
	}
}

// TestGatewayStatus: a gateway in front of a farm (with no-op executors:
// no root needed) runs actions there, and its Admin status shows the
// backend, healthy, then unhealthy once the remote is gone.
func TestGatewayStatus(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	rcfg := config.Default()
	rcfg.Data = t.TempDir()
	rcfg.Executor.Sandbox = "noop"
	remote, err := StartEmbedded(rcfg, log)
	if err != nil {
		t.Fatal(err)
	}
	remoteUp := true
	defer func() {
		if remoteUp {
			remote.Close()
		}
	}()
	gcfg := config.Default()
	gcfg.Data = t.TempDir()
	gcfg.Execution = config.Execution{Backend: config.BackendRemote, Remote: &config.Remote{
		Address: remote.Addr, DigestFunction: "sha256", IsolatedNetwork: true, RPCTimeout: config.Duration(5 * time.Second)}}
	gw, err := StartEmbedded(gcfg, log)
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	conn, err := grpc.NewClient(gw.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// An action through the gateway: the no-op executors "run" it.
	cas := blobstore.NewGRPC(conn, "", blobstore.GRPCOptions{})
	put := func(m proto.Message) digest.Digest {
		b, _ := proto.Marshal(m)
		d := digest.Compute(digest.SHA256, b)
		if err := blobstore.PutBytes(ctx, cas, d, b); err != nil {
			t.Fatal(err)
		}
		return d
	}
	cmd := put(&repb.Command{Arguments: []string{"/bin/true"}, OutputPaths: []string{"out"}})
	ad := put(&repb.Action{CommandDigest: cmd.Proto(), InputRootDigest: digest.Empty(digest.SHA256).Proto(), DoNotCache: true})
	stream, err := repb.NewExecutionClient(conn).Execute(ctx, &repb.ExecuteRequest{ActionDigest: ad.Proto(), DigestFunction: repb.DigestFunction_SHA256})
	if err != nil {
		t.Fatal(err)
	}
	for {
		op, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if op.Done {
			if op.GetError() != nil {
				t.Fatalf("operation failed: %v", op.GetError())
			}
			break
		}
	}

	admin := adminpb.NewAdminClient(conn)
	st, err := admin.Status(ctx, &adminpb.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	x := st.Execution
	if x == nil || x.Backend != "remote" || x.Address != remote.Addr || !x.Healthy || x.DigestFunction != "sha256" || x.Forwarded != 1 {
		t.Fatalf("execution status %v", x)
	}
	if !slices.Contains(st.Roles, "gateway") || slices.Contains(st.Roles, "scheduler") {
		t.Errorf("roles %v", st.Roles)
	}
	caps, err := repb.NewCapabilitiesClient(conn).GetCapabilities(ctx, &repb.GetCapabilitiesRequest{})
	if err != nil || !caps.GetExecutionCapabilities().GetExecEnabled() || caps.GetExecutionCapabilities().GetDigestFunction() != repb.DigestFunction_SHA256 {
		t.Errorf("capabilities %v %v", caps, err)
	}

	remote.Close()
	remoteUp = false
	st, err = admin.Status(ctx, &adminpb.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.Execution.Healthy || st.Execution.Error == "" {
		t.Errorf("status with the remote gone: %v", st.Execution)
	}
}
