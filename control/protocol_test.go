package control

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

func TestDecodeRequest(t *testing.T) {
	for _, c := range []struct {
		in       string
		want     Request
		wantErr  string
		wantCode Code
	}{
		{in: `{"v":1,"op":"status"}` + "\n", want: Request{V: 1, Op: OpStatus}},
		{in: `{"v":1,"op":"stop"}`, want: Request{V: 1, Op: OpStop}},
		{in: `{"v":1,"op":"restart","command":["/srv/api","-x"],"check":["true"],"no_wait":true}` + "\r\n",
			want: Request{V: 1, Op: OpRestart, Command: []string{"/srv/api", "-x"}, Check: []string{"true"}, NoWait: true}},
		{in: `{"v":1,"op":"restart","future_field":7}` + "\n", want: Request{V: 1, Op: OpRestart}},
		{in: "", wantErr: "no line", wantCode: CodeBadRequest},
		{in: "{\n", wantErr: "malformed", wantCode: CodeBadRequest},
		{in: `{"v":1,"op":"status"} {"v":1}` + "\n", wantErr: "more than one", wantCode: CodeBadRequest},
		{in: `{"v":2,"op":"status"}` + "\n", wantErr: "version 2", wantCode: CodeBadVersion},
		{in: `{"op":"status"}` + "\n", wantErr: "version 0", wantCode: CodeBadVersion},
		{in: `{"v":1,"op":"reboot"}` + "\n", wantErr: "unknown op", wantCode: CodeUnknownOp},
		{in: `{"v":1,"op":"status","no_wait":true}` + "\n", wantErr: "no arguments", wantCode: CodeBadRequest},
		{in: `{"v":1,"op":"restart","command":[""]}` + "\n", wantErr: "empty program", wantCode: CodeBadRequest},
		{in: `{"v":1,"op":"restart","command":["a\u0000b"]}` + "\n", wantErr: "NUL", wantCode: CodeBadRequest},
		{in: strings.Repeat(" ", MaxRequest+10) + "\n", wantErr: "request longer than 65536 bytes", wantCode: CodeTooLarge},
	} {
		got, err := decodeRequest(strings.NewReader(c.in))
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("decodeRequest(%.40q) error = %v, want one mentioning %q", c.in, err, c.wantErr)
			}
			if code := codeOf(err); code != c.wantCode {
				t.Errorf("decodeRequest(%.40q) error code %q, want %q", c.in, code, c.wantCode)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, c.want) {
			t.Errorf("decodeRequest(%.40q) = %+v, %v; want %+v", c.in, got, err, c.want)
		}
	}
}

// FuzzDecodeRequest: any input either decodes to a request that survives
// a round trip, or is an error; it never panics or reads past its limit.
func FuzzDecodeRequest(f *testing.F) {
	for _, seed := range []string{
		`{"v":1,"op":"status"}` + "\n",
		`{"v":1,"op":"restart","command":["/bin/x","--y"],"check":["nginx","-t"],"no_wait":true}` + "\n",
		`{"v":1,"op":"stop"}`,
		"{\"v\":1,\"op\":\"restart\",\"command\":[\"\\u0000\"]}\n",
		"\n\n",
		`[1,2,3]`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := decodeRequest(bytes.NewReader(data))
		if err != nil {
			if len(data) > MaxRequest+1 && bytes.IndexByte(data[:MaxRequest+1], '\n') < 0 && codeOf(err) != CodeTooLarge {
				t.Fatalf("oversized input gave %v (code %s), want %s", err, codeOf(err), CodeTooLarge)
			}
			if codeOf(err) == CodeInternal {
				t.Fatalf("decoding error %v has no code", err)
			}
			return
		}
		b, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		again, err := decodeRequest(bytes.NewReader(append(b, '\n')))
		if err != nil {
			t.Fatalf("re-encoded request %s does not decode: %v", b, err)
		}
		if !reflect.DeepEqual(normalize(req), normalize(again)) {
			t.Fatalf("round trip changed %+v into %+v", req, again)
		}
	})
}

// normalize treats nil and empty slices alike.
func normalize(r Request) Request {
	if len(r.Command) == 0 {
		r.Command = nil
	}
	if len(r.Check) == 0 {
		r.Check = nil
	}
	return r
}
